"""What `rsq` says when a command is interrupted: the command records its output directory here,
rsq.cli.main reads it (a module of its own, so that main and the commands do not import each other)."""

from __future__ import annotations

INTERRUPT_HINT: dict = {}  # set by the command: "out" -> the quantize output directory
