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

from rsq.api import load, quantize
from rsq.config import RSQConfig
from rsq.generation import decode_kwargs, generate
from rsq.io.hf import install_hook as _install_hook
from rsq.version import __version__

# The one side effect of `import rsq`: ``quant_method: "rsq"`` is registered with transformers'
# quantizer API (rsq.io.hf), so that AutoModelForCausalLM.from_pretrained(rsq checkpoint) works
# after `import rsq` (the README's contract). transformers has no lazy registration, and importing
# it here would make `import rsq` seconds slower (1.6 s -> 4.6 s on the 2-core CPU, loaded), so where
# transformers.quantizers is not imported yet a one-shot finder at the head of sys.meta_path waits
# for it, registers rsq right after it loads, and removes itself (rsq.io.hf.install_hook;
# rsq.io.hf.uninstall_hook takes it back earlier). Nothing else is patched at import.
_install_hook()

__all__ = ["RSQConfig", "quantize", "load", "generate", "decode_kwargs", "__version__"]
