"""The file-level contract of an rsq checkpoint directory (format_version 1).

* ``config.json`` is the model's Hugging Face config plus a ``quantization_config`` with
  ``quant_method: "rsq"``, ``format_version``, the grid (a format name registered in rsq/formats/),
  bits, group size, symmetry, the list of quantized ``modules``, the rotation record with every
  online site and its seed, and the full RSQConfig;
* ``model.safetensors`` (or shards with ``model.safetensors.index.json``) holds, for every
  quantized linear ``P``, the tensors its format stores (``P.<key>`` for the format's
  ``tensor_keys``, plus ``P.bias`` when it has one), and every other tensor under its usual name;
* the tokenizer and generation config files as ``save_pretrained`` writes them.

What the per-linear tensors are, and how they turn into weights, is each format's business
(rsq/formats/uniform.py, nf.py, e8p.py); this module only joins the two.
"""

from __future__ import annotations

import torch

from rsq.config import GridConfig
from rsq.solver.result import QuantResult

# config.json key whose presence makes plain transformers (without rsq's quantizer) refuse the
# checkpoint instead of loading random weights; rsq.io.hf removes it when rsq loads the checkpoint
GUARD_KEY = "transformers_weights"
GUARD = (
    "rsq checkpoint: plain transformers cannot read its packed weights. Run `import rsq` before "
    "from_pretrained (pip install rsq), or use rsq.load(DIR) / `rsq generate DIR PROMPT`"
)

QUANT_METHOD = "rsq"
FORMAT_VERSION = 1


def quantized_module_tensors(
    res: QuantResult, grid: GridConfig, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized linear: its format's, and the bias."""
    out = grid.format.stored_tensors(res, grid, dtype)
    if bias is not None:
        out["bias"] = bias.detach()
    return out


def dequantize_result(res: QuantResult, grid: GridConfig) -> torch.Tensor:
    """W_hat (out, in) float32 from a result's codes and scales — equal to the solver's W_hat."""
    return grid.format.dequantize_result(res, grid)
