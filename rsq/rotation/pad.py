"""Zero-padding of the MLP width (``RotationConfig.pad_mlp``, ``--pad-mlp``; issue 33 item 4).

``--online-rotations export`` rotates the down_proj input with a block-diagonal Sylvester Hadamard
whose block is the largest power of two dividing the MLP width (rsq.rotation.rotate.export_block):
8960 = 35 x 256 gets blocks of only 256. Padding the width to W' >= W with zeros lets a larger
power-of-two block fit (8960 -> 9216 = 9 x 1024, 8960 -> 10240 = 5 x 2048, 1536 -> 2048 = one block
of 2048) while the export stays a compressed-tensors ``hadamard`` transform (which vLLM applies with
its Hadacore kernel: read in vLLM's code, not run here).

The padding is exactly function-preserving for a gated MLP down(act(gate(x)) * up(x)): the new
gate_proj and up_proj output rows (and bias entries) are zero, so the new features are
act(0) * 0 = 0 for any finite activation, and the new down_proj input columns are zero, so they
add nothing either. It happens before the layer's rotation; the rotation then mixes the padded
down_proj columns with the others (W' = [W 0]·Hᵀ is dense), and the rotated, padded model is an
ordinary model of the same family whose ``config.intermediate_size`` is W'.

Cost: the MLP weights (and their share of the checkpoint and of a decode step's reads) grow by
W'/W - 1 (1536 -> 2048 on SmolLM2: +33 %; 8960 -> 9216 on Qwen2.5-1.5B: +2.9 %). The padded
gate/up rows quantize to exact zeros on the uniform grid (an all-zero row gets scale 1 and its zero
code) and the nf grid; the e8p grid, whose codebook has no zero point, is refused (rsq.config).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from rsq.errors import ConfigError
from rsq.models.adapter import ModelAdapter

# pad_mlp "auto" (the default; issue 33 item 4): under --online-rotations export with the automatic
# block, an MLP whose largest power-of-two factor is below AUTO_BLOCK is padded to the next multiple of
# AUTO_BLOCK, when that grows it by at most AUTO_MAX_GROWTH; every other width stays. Measured on
# Qwen2.5-Coder-1.5B (8960 = 35 x 256 -> 9216 = 9 x 1024, +2.9 %; rsq 3-bit, bench/NOTES-importance.md
# session 15): 20.16 -> 19.02 (exact 18.81), the 256-wide blocks left layer 2's massive down_proj
# channel nearly unspread (its GPTQ loss 1548x exact's; 3.7x with 1024-wide blocks). The growth cap
# keeps the default model (SmolLM2: 1536 = 3 x 512, +33 % to 2048, where export already cost nothing
# against exact) and Llama/Mistral (14336 = 7 x 2048) as they were.
AUTO_BLOCK = 1024
AUTO_MAX_GROWTH = 1 / 16
AUTO = "auto"


def pow2_block(width: int) -> int:
    """The largest power of two dividing ``width`` (export's automatic down_proj block)."""
    return width & -width


def next_auto_multiple(width: int) -> int:
    """The smallest multiple of AUTO_BLOCK that is >= ``width``."""
    return -(-width // AUTO_BLOCK) * AUTO_BLOCK


def auto_width(width: int) -> int:
    """What "auto" pads an MLP of ``width`` to under export with the automatic block: the next
    multiple of AUTO_BLOCK where the width's power-of-two block is smaller and the growth is at
    most AUTO_MAX_GROWTH, else ``width`` (no padding)."""
    if width < 1 or pow2_block(width) >= AUTO_BLOCK:
        return width
    target = next_auto_multiple(width)
    return target if target - width <= AUTO_MAX_GROWTH * width else width


def padded_width(width: int, pad: int | str, rotation=None) -> int:
    """The MLP width after ``--pad-mlp pad`` of a model whose width is ``width``: ``width`` for 0;
    for "auto" :func:`auto_width` where ``rotation`` (a RotationConfig; None: any) lets it pad
    (RotationConfig.auto_pad_applies), else ``width``; an explicit width must be >= ``width`` (ConfigError)."""
    if pad == 0:
        return width
    if pad == AUTO:
        return auto_width(width) if rotation is None or rotation.auto_pad_applies else width
    if pad < width:
        raise ConfigError(
            f"--pad-mlp {pad} is smaller than the MLP width {width}: padding only adds zero features; use a "
            f"width >= {width} (e.g. {next_auto_multiple(width)}), auto, or 0 (no padding)"
        )
    return int(pad)


@dataclass(frozen=True)
class MlpPadding:
    """Padding of every decoder layer's MLP from ``original`` to ``padded`` features."""

    original: int
    padded: int

    @property
    def extra(self) -> int:
        return self.padded - self.original

    @property
    def record(self) -> dict:
        """What results.json and the checkpoint's quantization_config record (rotation.mlp_padding)."""
        return {
            "original_width": self.original,
            "padded_width": self.padded,
            "weight_growth": self.extra / self.original,  # the MLP weights grow by this fraction
        }


def plan_padding(model: nn.Module, adapter: ModelAdapter, width: int, rotation) -> MlpPadding | None:
    """The padding ``rotation.pad_mlp`` asks for on ``model`` (MLP ``width``), None when there is none
    to do; ConfigError where the MLP is not a gated gate/up/down one or the pad is below the width."""
    target = padded_width(width, rotation.pad_mlp, rotation)
    if target == width:
        return None
    if not gated_mlp(model, adapter):
        if rotation.pad_mlp == AUTO:  # the default pads only what padding preserves
            return None
        kind = getattr(model.config, "model_type", type(model).__name__)
        names = (adapter.gate_proj, adapter.up_proj, adapter.down_proj)
        raise ConfigError(
            f"--pad-mlp needs a gated MLP down(act(gate(x)) * up(x)) of plain linears ({', '.join(names)}), "
            f"which {kind} does not have: drop --pad-mlp"
        )
    return MlpPadding(width, target)


def gated_mlp(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Whether the first decoder layer's MLP is down(act(gate(x)) * up(x)) with plain linears: zero
    padding preserves the function only there."""
    layer = adapter.get_layers(model)[0]
    names = (adapter.gate_proj, adapter.up_proj, adapter.down_proj)
    try:
        linears = [layer.get_submodule(n) for n in names]
        parent = layer.get_submodule(adapter.gate_proj.rpartition(".")[0]) if "." in adapter.gate_proj else layer
    except AttributeError:
        return False
    return (
        all(isinstance(m, nn.Linear) for m in linears)
        and hasattr(parent, "act_fn")
        and hasattr(model.config, "intermediate_size")
    )


def _pad_rows(lin: nn.Linear, extra: int) -> None:
    w = lin.weight.data
    lin.weight.data = torch.cat([w, w.new_zeros(extra, w.shape[1])])
    if lin.bias is not None:
        lin.bias.data = torch.cat([lin.bias.data, lin.bias.data.new_zeros(extra)])
    lin.out_features = lin.weight.shape[0]


def _pad_cols(lin: nn.Linear, extra: int) -> None:
    w = lin.weight.data
    lin.weight.data = torch.cat([w, w.new_zeros(w.shape[0], extra)], dim=1)
    lin.in_features = lin.weight.shape[1]


@torch.no_grad()
def pad_layer(layer: nn.Module, adapter: ModelAdapter, padding: MlpPadding) -> None:
    """Zero-pad one decoder layer's MLP in place, where it lives: gate_proj and up_proj get
    ``padding.extra`` zero output rows (and bias entries), down_proj as many zero input columns.
    The modules stay the same objects (hooks, and references to them, keep working)."""
    down = layer.get_submodule(adapter.down_proj)
    if down.in_features != padding.original:
        raise RuntimeError(
            f"{adapter.down_proj} is {down.in_features} wide, the padding plan expects {padding.original}: "
            "a layer padded twice, or layers of different widths"
        )
    for name in (adapter.gate_proj, adapter.up_proj):
        _pad_rows(layer.get_submodule(name), padding.extra)
    _pad_cols(down, padding.extra)


def padded_config(config, rotation):
    """``config`` as the rotated model will describe it: a copy with the padded intermediate_size
    under ``rotation.pad_mlp`` (what memory plans and width checks before any weight is read need),
    ``config`` itself otherwise; ConfigError (before any weight is read) for a width below the MLP's."""
    width = getattr(config, "intermediate_size", None)
    if not (rotation.enabled and rotation.pad_mlp) or width is None:  # no MLP width: refused at plan time
        return config
    target = padded_width(width, rotation.pad_mlp, rotation)
    if target == width:
        return config
    out = copy.deepcopy(config)
    pad_config(out, MlpPadding(width, target))
    return out


def pad_config(config, padding: MlpPadding) -> None:
    """``config.intermediate_size`` (and its text config's) becomes the padded width, so every
    checkpoint and export written from the model describes the padded MLP."""
    configs = [config]
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        configs.append(config.get_text_config())
    for c in configs:
        c.intermediate_size = padding.padded
