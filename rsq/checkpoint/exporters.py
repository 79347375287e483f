"""The exporter registry: every ``rsq export --format NAME`` target, what it accepts, how it converts.

    name                bits      --online-rotations   layout (module)
    compressed-tensors  2 3 4 8   none, export, exact* pack-quantized int weights, down_proj block Hadamard
                                                       as a ``hadamard`` transform (``random-hadamard`` with the
                                                       matrix stored for a non-power-of-2 --export-block;
                                                       rsq/checkpoint/export.py)
    gptq                2 3 4 8   none                 GPTQ v1 (rsq/checkpoint/export_gptq.py)

    * exact only where every online site is a power-of-2 Sylvester Hadamard (the exporter checks each
      site); rsq's other Hadamards and the cross-head rotation have no compressed-tensors transform.

The number format decides first (``NumberFormat.exports`` in rsq/formats/: uniform exports to both,
NormalFloat and E8P to neither), then the exporter's widths and rotation settings, then the
exporter's own per-site and per-linear checks. Every refusal is one :class:`ExportError` line
naming what would work, raised before anything is written. The shared writing half lives here
too: :func:`open_export` (the checks) and :func:`write_export_dir` (temporary sibling directory,
tokenizer files, rename into place).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rsq.checkpoint.load import read_quant_config
from rsq.errors import CheckpointFormatError, ConfigError, ExportError
from rsq.formats import get_format
from rsq.rotation.online import RUNTIME_KINDS

MAX_SHARD = "2GB"
# files copied unchanged: tokenizer, chat template, generation defaults
COPY_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab.*",
    "merges.txt",
    "generation_config.json",
)


@dataclass(frozen=True)
class Exporter:
    """One export target.

    bits: the widths its layout holds. settings: the ``--online-rotations`` settings whose run-time
    sites it can carry (a checkpoint without run-time sites passes whatever its setting).
    convert: ``"module:function"``, called as ``function(src, out, overwrite=...)`` -> summary dict
    (format, bits, group_size, symmetric, modules, bytes; optional transforms, ignore).
    check: optional ``"module:function"``, ``function(qc)``, the exporter's own checks after the
    shared ones (e.g. compressed-tensors' per-site Sylvester check).
    """

    name: str
    bits: tuple[int, ...]
    settings: tuple[str, ...]
    convert: str
    help: str
    check: str | None = None

    def run(self, src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
        return _resolve(self.convert)(src, out, overwrite=overwrite)


EXPORTERS: dict[str, Exporter] = {
    e.name: e
    for e in (
        Exporter(
            "compressed-tensors",
            bits=(2, 3, 4, 8),
            settings=("none", "export", "exact"),
            convert="rsq.checkpoint.export:export_compressed_tensors",
            check="rsq.checkpoint.export:check_sites",
            help="pack-quantized 2/3/4/8-bit int weights (vLLM's compressed-tensors WNA16), the down_proj "
            "block Hadamard of --online-rotations export as its hadamard transform (a non-power-of-two "
            "--export-block: random-hadamard with the matrix stored)",
        ),
        Exporter(
            "gptq",
            bits=(2, 3, 4, 8),
            settings=("none",),
            convert="rsq.checkpoint.export_gptq:export_gptq",
            help="GPTQ v1 layout, plain linears only (--online-rotations none); vLLM serves its 4/8 bits",
        ),
    )
}


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def get_exporter(name: str) -> Exporter:
    try:
        return EXPORTERS[name]
    except KeyError:
        raise ExportError(f"unknown export format {name!r}: choose one of {', '.join(EXPORTERS)}") from None


def export(src: str | Path, out: str | Path, fmt: str, overwrite: bool = False) -> dict:
    """Write ``out``: the rsq checkpoint ``src`` in the layout of exporter ``fmt``; returns its summary."""
    return get_exporter(fmt).run(src, out, overwrite=overwrite)


def runtime_sites(qc: dict) -> list[dict]:
    """The checkpoint's online rotation sites that run at inference time."""
    return [s for s in (qc.get("rotation") or {}).get("online", []) if s["kind"] in RUNTIME_KINDS]


def check_exportable(qc: dict, name: str) -> None:
    """ExportError (one line, naming what would work) unless exporter ``name`` can hold the checkpoint."""
    exporter = get_exporter(name)
    bits = qc.get("bits")
    if not qc.get("modules"):
        raise ExportError(
            f"the checkpoint has no quantized linears (method {qc.get('method')}): there is nothing to pack; "
            f"quantize with --bits {' / '.join(str(b) for b in exporter.bits)} first"
        )

    try:
        fmt = get_format(qc.get("grid", "uniform"))
    except ConfigError as exc:
        raise ExportError(f"{exc}: the checkpoint's format is unknown to this rsq") from None
    fmt.check_export(name, bits)  # the number format's own word (NormalFloat, E8P: no integer layout)
    if bits not in exporter.bits:
        others = [e.name for e in EXPORTERS.values() if bits in e.bits and e.name in fmt.exports]
        widths = ", ".join(str(b) for b in exporter.bits)
        raise ExportError(
            f"{bits}-bit weights cannot be exported to {name}, which holds {widths} bits: re-quantize with "
            f"--bits {' or '.join(str(b) for b in exporter.bits if b in fmt.bits)}"
            + (f", or export --format {' / '.join(others)}" if others else "")
        )
    sites = runtime_sites(qc)
    setting = (qc.get("rotation") or {}).get("online_setting", "exact")
    if sites and setting not in exporter.settings:
        where = ", ".join(f"{s['module']} ({s['kind']})" for s in sites)
        others = [e.name for e in EXPORTERS.values() if setting in e.settings and e.name in fmt.exports]
        raise ExportError(
            f"the checkpoint applies online rotations at {where} (--online-rotations {setting}), which the "
            f"{name} layout cannot carry: re-quantize with --online-rotations {' or '.join(exporter.settings)}"
            + (f", or export --format {' / '.join(others)}" if others else "")
        )
    if exporter.check is not None:
        _resolve(exporter.check)(qc)


def meta_model(src: Path):
    """The model skeleton on the meta device (names and shapes only, nothing read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not a transformers quantizer
    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config)


def open_export(src: Path, out: Path, overwrite: bool, name: str) -> tuple:
    """(config, quantization_config, {linear name: in_features}) of the checkpoint ``src``, after the
    checks every export makes before writing anything: ``out`` free (or ``overwrite``) and not the
    source, :func:`check_exportable` for exporter ``name``, every quantized module a linear."""
    config, qc = read_quant_config(src)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ExportError(f"--out {out} is the source checkpoint: choose another directory")
    check_exportable(qc, name)
    model = meta_model(src)
    linears = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in qc["modules"] if m not in linears]
    if missing:
        raise CheckpointFormatError(f"{src}: quantized modules {missing[:3]} are not linears of the model config")
    return config, qc, linears


def write_weights(tensors: dict[str, torch.Tensor], out: Path) -> None:
    """``tensors`` as safetensors shards of at most MAX_SHARD (with an index when sharded)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum((out / f).stat().st_size for f in split.filename_to_tensors)
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_provenance(out: Path, fmt: str, qc: dict) -> None:
    """``rsq_export.json``: the target format and the source's quantization_config (minus the module list)."""
    provenance = {k: v for k, v in qc.items() if k not in ("modules", "rsq_config")}
    (out / "rsq_export.json").write_text(json.dumps({"format": fmt, "source": provenance}, indent=2))


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``, replacing an existing ``out``."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def write_export_dir(src: Path, out: Path, write) -> None:
    """Build an export in a temporary sibling of ``out`` (``write(tmp)`` writes weights, config and
    card), copy ``src``'s tokenizer files beside them, then rename it onto ``out``; on any error or
    interrupt the temporary directory is removed, so ``out`` is absent, the old one or complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for pattern in COPY_PATTERNS:
            for f in src.glob(pattern):
                shutil.copy2(f, tmp / f.name)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe(summary: dict, out: str | Path) -> str:
    """The one line ``rsq export`` prints for an exporter's summary."""
    group = "per channel" if summary["group_size"] == -1 else f"group {summary['group_size']}"
    sym = "symmetric" if summary["symmetric"] else "asymmetric"
    line = (
        f"wrote {out}/ ({summary['format']}, {summary['bits']}-bit {sym} {group}, {summary['modules']} linears, "
        f"{summary['bytes'] / 2**20:.1f} MiB of weights"
    )
    if "ignore" in summary:
        line += f"; float: {', '.join(summary['ignore']) or 'none'}"
    if summary.get("transforms"):
        line += f"; online Hadamard transform on {', '.join(summary['transforms'])}"
    return line + ")"
