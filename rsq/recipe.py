"""Recipes: an RSQConfig as a YAML or JSON file (the same file ``rsq quantize --config FILE`` and
``rsq.quantize(config=FILE)`` read).

A recipe is the nested dict of :meth:`RSQConfig.to_dict` with any field left out; fields left out
take their defaults, and the method's presets fill rotation, importance and solver exactly as the
``--method`` flag does, e.g.::

    method: rsq
    grid: {bits: 3, group_size: -1}
    calib: {nsamples: 128, seqlen: 512}
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from rsq.config import DEFAULT_METHOD, RSQConfig
from rsq.errors import ConfigError

SECTIONS = ("grid", "solver", "rotation", "importance", "calib")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The dict in a .json, .yaml or .yml recipe file; ConfigError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist: pass a .yaml or .json file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"recipe {path}: use a .yaml, .yml or .json file")
    except ImportError as exc:
        raise ConfigError(f"recipe {path}: YAML recipes need pyyaml (pip install pyyaml), or use .json") from exc
    except ValueError as exc:
        raise ConfigError(f"recipe {path} is not valid JSON ({exc})") from exc
    except Exception as exc:  # yaml.YAMLError (not a ValueError)
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]})") from exc
        raise
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must hold a mapping of config fields, got {type(data).__name__}")
    return data


def config_from_recipe(data: dict[str, Any]) -> RSQConfig:
    """An RSQConfig from a (partial) recipe dict, with the method's presets for what it leaves out."""
    data = copy.deepcopy(data)
    method = data.pop("method", DEFAULT_METHOD)
    parts = {}
    for name in SECTIONS:
        section = data.pop(name, None) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"recipe field {name!r} must be a mapping, got {section!r}")
        parts[name] = dict(section)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RSQConfig)})
    if unknown:
        raise ConfigError(f"unknown recipe field(s) {', '.join(unknown)}: see rsq/config.py for the fields")
    return RSQConfig.for_method(method, **parts, **data)


def write_recipe(cfg: RSQConfig, path: str | Path) -> Path:
    """Write ``cfg`` as a recipe (.json, or .yaml/.yml) that :func:`config_from_recipe` reads back."""
    path = Path(path)
    data = cfg.to_dict()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False))
    else:
        path.write_text(json.dumps(data, indent=2))
    return path
