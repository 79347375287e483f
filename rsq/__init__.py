"""rsq: Rotate, Scale, then Quantize — low-bit post-training quantization of LLMs.

Public API (everything else is import-by-path and may change):

* ``RSQConfig`` — the config tree (rsq.config);
* ``quantize(config, out, model=..., tokenizer=..., calibration=...)`` — quantize and write a
  checkpoint; returns its directory (rsq.api);
* ``load(path)`` — (model, tokenizer) from an rsq checkpoint (rsq.api);
* ``generate(model, input_ids, max_new_tokens)`` — rsq's decode loop: prompt + new tokens as
  transformers' ``generate`` returns them, a compiled step with CUDA graphs on a GPU (rsq.generation);
* ``decode_kwargs(device)`` — ``generate`` settings for fast decoding: static cache + compiled
  decode step on a GPU, {} on the CPU (rsq.generation).
"""

from rsq.config import RSQConfig
from rsq.io.hf import install_hook as _install_hook  # noqa: E402
from rsq.version import __version__

_install_hook()  # AutoModelForCausalLM.from_pretrained(rsq checkpoint) works after `import rsq`


from rsq.api import load, quantize  # noqa: E402
from rsq.generation import decode_kwargs, generate  # noqa: E402

__all__ = ["RSQConfig", "quantize", "load", "generate", "decode_kwargs", "__version__"]
