"""Number formats behind one protocol (rsq/formats/base.py) and their registry.

    uniform  2/3/4/8-bit integer codes with scales and zero points (GPTQ)      rsq/formats/uniform.py
    nf       2/3/4/8-bit NormalFloat level indices with scales (GPTQ)          rsq/formats/nf.py
    e8p      2-bit E8P lattice codebook, 8 weights per 16-bit code (LDLQ)      rsq/formats/e8p.py

Adding a format: one module here defining a :class:`NumberFormat` subclass, registered with
:func:`register_format` and imported by ``_load_builtin``; tests/unit/test_formats.py then covers
it through the registry.
"""

from rsq.formats.base import NumberFormat, ScalarOps, format_names, get_format, register_format

__all__ = ["NumberFormat", "ScalarOps", "format_names", "get_format", "register_format"]
