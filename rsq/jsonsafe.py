"""JSON that is always valid: NaN and infinities become ``null``, and the document says which.

``json.dumps`` writes a bare ``NaN`` / ``Infinity`` by default, which is not JSON (strict parsers
and other languages reject the file). :func:`dumps` writes them as ``null`` and, for a mapping at
the top, lists each replaced value under ``"non_finite"`` with what it was.
"""

from __future__ import annotations

import json
import math
from typing import Any

NOTE = "values that were NaN or infinite, written as null (path: original value)"


def _clean(obj: Any, path: str, found: dict[str, str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        found[path or "."] = repr(obj)
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def finite(obj: Any) -> tuple[Any, dict[str, str]]:
    """(a copy with non-finite floats replaced by None, {path: original value})."""
    found: dict[str, str] = {}
    return _clean(obj, "", found), found


def dumps(obj: Any, **kw) -> str:
    clean, found = finite(obj)
    if found and isinstance(clean, dict):
        clean["non_finite"] = {"note": NOTE, **found}
    return json.dumps(clean, allow_nan=False, **kw)
