"""Activation outlier statistics of every linear's input, before and after rotation.

For the input X (tokens × features) of each linear: ``max_over_rms`` = max|x| / rms(x) over all
entries, and ``kurtosis`` = E[(x-μ)^4] / σ^4 over all entries (3 for a Gaussian; outlier
channels make it large). Rotation should bring both down (QuaRot's point).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rsq.config import RotationConfig
from rsq.models.adapter import ModelAdapter
from rsq.report.plotting import plain_log_yaxis, pyplot
from rsq.rotation import rotate_model

SITES = ("q_proj", "o_proj", "up_proj", "down_proj")  # one linear per distinct input


def input_stats(x: torch.Tensor) -> dict[str, float]:
    x = x.detach().double().reshape(-1)
    mu, sigma = x.mean(), x.std()
    rms = x.pow(2).mean().sqrt()
    return {
        "max_over_rms": (x.abs().max() / rms).item(),
        "kurtosis": (((x - mu) / sigma) ** 4).mean().item(),
    }


@contextmanager
def _record_inputs(model: nn.Module, adapter: ModelAdapter, sink: dict) -> Iterator[None]:
    handles = []
    for i, layer in enumerate(adapter.get_layers(model)):
        for site in SITES:
            module = layer.get_submodule(getattr(adapter, site))

            def hook(mod, args, out, key=(i, site)):
                sink.setdefault(key, []).append(args[0].detach().float().cpu())

            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activation_stats(model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, device: torch.device) -> dict:
    """{site: {"max_over_rms": [per layer], "kurtosis": [per layer]}} over the given windows."""
    sink: dict = {}
    model.to(device)
    with _record_inputs(model, adapter, sink):
        for ids in windows.split(2):
            model(input_ids=ids.to(device), use_cache=False)
    model.to("cpu")
    n_layers = len(adapter.get_layers(model))
    out: dict = {site: {"max_over_rms": [], "kurtosis": []} for site in SITES}
    for site in SITES:
        for i in range(n_layers):
            stats = input_stats(torch.cat(sink[(i, site)]))
            for k, v in stats.items():
                out[site][k].append(v)
    return out


def compare_rotation(
    model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor, device: torch.device, cfg: RotationConfig
) -> dict:
    """Stats of the model as given and of a rotated copy (the same family: the same ``adapter``)."""
    before = activation_stats(model, adapter, windows, device)
    rotated = copy.deepcopy(model)
    record = rotate_model(rotated, adapter, cfg)
    after = activation_stats(rotated, adapter, windows, device)
    return {"before": before, "after": after, "rotation": record}


def plot_stats(stats: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(2, len(SITES), figsize=(4 * len(SITES), 6), sharex=True)
    for col, site in enumerate(SITES):
        for row, metric in enumerate(("max_over_rms", "kurtosis")):
            ax = axes[row][col]
            for label in ("before", "after"):
                if label in stats:
                    ax.plot(stats[label][site][metric], label=f"{label} rotation", marker=".")
            plain_log_yaxis(ax)
            ax.set_title(f"{site} input: {metric.replace('_', ' ')}", fontsize=9)
            if row == 1:
                ax.set_xlabel("layer")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(stats: dict) -> list[str]:
    lines = [f"{'input of':<10} {'metric':<13} {'before (mean/max)':>20} {'after (mean/max)':>20}"]
    for site in SITES:
        for metric in ("max_over_rms", "kurtosis"):
            cells = []
            for label in ("before", "after"):
                v = stats.get(label, {}).get(site, {}).get(metric)
                cells.append(f"{sum(v) / len(v):9.1f} /{max(v):9.1f}" if v else "-")
            lines.append(f"{site:<10} {metric:<13} {cells[0]:>20} {cells[1]:>20}")
    return lines
