"""Number formats behind one protocol (rsq/formats/base.py) and their registry.

    uniform  2/3/4/8-bit integer codes with scales and zero points (GPTQ)      rsq/formats/uniform.py
             QuantLinear; humming, Triton GEMV / tiles / dequant+cuBLAS / GEMM, reference
    nf       2/3/4/8-bit NormalFloat level indices with scales (GPTQ)          rsq/formats/nf.py
             NFQuantLinear; reference
    e8p      2-bit E8P lattice codebook, 8 weights per 16-bit code (LDLQ)      rsq/formats/e8p.py
             E8PLinear; Triton GEMV / tiles / dequant+cuBLAS, reference

Each module declares everything that runs its format: the :class:`NumberFormat` (registered with
:func:`register_format`), its ``nn.Module`` (a :class:`rsq.nn.linear.QuantizedLinear`) and its
kernel backends (registered with :func:`rsq.kernels.backends.register_backend`; the pure-torch
reference among them). Adding a format is one module here, listed in ``BUILTIN``
(CONTRIBUTING.md, "Add a number format / a kernel backend"); tests/unit/test_formats.py then covers
it through the registry.
"""

from rsq.formats.base import NumberFormat, ScalarOps, format_names, get_format, register_format

__all__ = ["NumberFormat", "ScalarOps", "format_names", "get_format", "register_format"]
