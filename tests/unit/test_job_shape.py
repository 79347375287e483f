"""The job layer keeps the shape issue 30 rebuilt it to: every function of rsq/job/ under 60 lines
(docstring included, from ``def`` to its last line), read from the source with ast. The parameter
count (at most 8) is ruff's PLR0913 (pyproject.toml), checked by CI's ``ruff check``.

Run as a script (``python3 tests/unit/test_job_shape.py``) it prints the five longest."""

from __future__ import annotations

import ast
from pathlib import Path

import rsq

JOB = Path(rsq.__file__).parent / "job"
MAX_LINES = 60


def function_lengths(root: Path) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function and method below ``root``, longest first."""
    rows = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(root.parent.parent)}:{node.lineno} {node.name}"
                rows.append((node.end_lineno - node.lineno + 1, where))
    return sorted(rows, reverse=True)


def test_the_length_counter_counts_lines():
    tree = ast.parse("def f(x):\n    '''doc'''\n    y = x\n\n    return y\n")
    node = tree.body[0]
    assert node.end_lineno - node.lineno + 1 == 5


def test_job_layer_functions_are_short():
    rows = function_lengths(JOB)
    assert len(rows) > 20  # the job layer's functions were found
    long = [f"{n} lines {where}" for n, where in rows if n >= MAX_LINES]
    assert long == [], "functions of rsq/job/ of 60 lines or more:\n" + "\n".join(long)


if __name__ == "__main__":
    for n, where in function_lengths(JOB)[:5]:
        print(f"{n:4d} lines  {where}")
