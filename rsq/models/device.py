"""The compute device a job or an evaluation runs on, from the --device option."""

from __future__ import annotations

import re

import torch

from rsq.errors import CalibrationError, ConfigError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CalibrationError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible: use cuda:0.."
            f"{torch.cuda.device_count() - 1}"
        )
    return torch.device(name)
