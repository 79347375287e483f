"""Export an rsq checkpoint directory to compressed-tensors (the format vLLM reads).

What maps, per quantized linear (rsq/checkpoint/schema.py is our side of the contract):

    rsq                           compressed-tensors ("pack-quantized", int weights)
    code c in [0, 2^b - 1]        q = c - 2^(b-1) in [-2^(b-1), 2^(b-1) - 1]
    zero z                        zp = z - 2^(b-1)    (none stored when symmetric: z = 2^(b-1))
    w_hat = scales * (c - z)      w = weight_scale * (q - zp)
    group_size -1 / g             strategy "channel" / "group" with group_size g
    act_order (static groups)     nothing: codes and groups are in natural column order already

The packed tensors are produced by compressed-tensors' own ``PackedQuantizationCompressor`` from
W_hat, then unpacked again and compared with our codes bit for bit (a float round trip that went
one code off would raise here rather than ship a different model).

What does not map, and is refused with :class:`ExportError` naming it:

* 2- and 3-bit widths: vLLM's compressed-tensors integer kernels (WNA16) take 4 or 8 bits only;
* the ``nf`` and ``e8p`` grids: compressed-tensors integer grids are uniform (w = s * (q - zp));
* an online rotation that compressed-tensors' ``transform_config`` cannot reproduce exactly. Its
  ``hadamard`` transform is Sylvester's matrix (power-of-2 orders) over the whole input or over
  contiguous ``head_dim`` blocks. So a ``full`` site whose matrix is Sylvester's is exported as an
  ``input`` transform on the same module; rsq's non-power-of-2 Hadamards (e.g. paley1(q=11) ⊗
  sylvester(128) for SmolLM2's 1536), cross-head rotations (H_heads ⊗ I_head_dim, a strided
  layout) and seeded random orthogonal matrices are refused. Rotations fused into the weights (the
  residual R1, the per-head v/o Hadamard) need nothing at run time and export as plain weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from rsq.checkpoint.load import _read_tensors, _weight_files, read_quant_config
from rsq.errors import CheckpointFormatError, ConfigError, ExportError

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gptq")
MAX_SHARD = "2GB"
RUNTIME_KINDS = ("full", "cross_head", "block", "random_full", "random_cross_head")  # kinds applied online
# compressed-tensors transform scheme name; also the middle of the transform weight's tensor key
TRANSFORM_GROUP = "rsq_online_hadamard"
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
class ExportPlan:
    """What the export writes: one quantization scheme for all quantized linears, the linears
    left in float (``ignore``), and the online transforms (None when there are none)."""

    scheme: object  # compressed_tensors.quantization.QuantizationScheme
    ignore: list[str]
    transform: object | None  # compressed_tensors.transform.TransformConfig
    transform_modules: list[str]  # module suffixes inside a layer that get an input transform


def _refuse_grid(qc: dict, target: str = "compressed-tensors") -> None:
    """ExportError unless the checkpoint's number format (rsq/formats/) can be written as ``target``."""
    from rsq.formats import get_format

    try:
        fmt = get_format(qc.get("grid", "uniform"))
    except ConfigError as exc:
        raise ExportError(f"{exc}: the checkpoint's format is unknown to this rsq") from None
    fmt.check_export(target, qc["bits"])


def _sylvester_site(site: dict) -> bool:
    """True when a ``full`` site's matrix is exactly compressed-tensors' ``hadamard`` one."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix, is_pow2

    from rsq.rotation.hadamard import hadamard_matrix

    n = site["size"]
    if site["kind"] != "full" or not is_pow2(n):
        return False
    return torch.equal(hadamard_matrix(n), deterministic_hadamard_matrix(n, torch.float64))


def _refuse_site(site: dict) -> ExportError:
    kind, n, where = site["kind"], site["size"], f"{site['module']} input"
    recipe = site.get("recipe", kind)
    if kind == "full":
        why = (
            f"rsq's order-{n} Hadamard ({recipe}) is not compressed-tensors' 'hadamard' "
            "transform, which is Sylvester's matrix (power-of-2 orders only), and "
            "'random-hadamard' uses other random signs and core matrices, so the rotated "
            "weights would meet a different rotation"
        )
    elif kind == "cross_head":
        why = (
            f"rsq rotates across the {n} heads (H_heads ⊗ I_head_dim, a strided layout); "
            "compressed-tensors transforms rotate the whole input or contiguous head_dim blocks"
        )
    else:
        why = "a seeded random orthogonal matrix has no compressed-tensors transform equivalent"
    return ExportError(
        f"online rotation at {where} ({kind}, order {n}) cannot be exported to "
        f"compressed-tensors: {why}; re-quantize with --online-rotations export (a down_proj Hadamard "
        "compressed-tensors reproduces) or --online-rotations none (rotations folded into the weights only)"
    )


def _transform_config(qc: dict):
    """(TransformConfig | None, module suffixes) for the online rotation sites, or ExportError."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    sites = [s for s in (qc.get("rotation") or {}).get("online", []) if s["kind"] in RUNTIME_KINDS]
    for site in sites:
        if site["kind"] != "block" and not _sylvester_site(site):
            raise _refuse_site(site)
    if not sites:
        return None, []
    groups = {}
    for i, site in enumerate(sites):
        args = TransformArgs(targets=[rf"re:.*\.{re.escape(site['module'])}$"], location="input")
        # a block site (--online-rotations export) is Sylvester's H_b on contiguous blocks of b
        block = site.get("head_dim") if site["kind"] == "block" else None
        groups[_group_name(i)] = TransformScheme(type="hadamard", apply=[args], head_dim=block)
    return TransformConfig(config_groups=groups), [s["module"] for s in sites]


def _group_name(i: int) -> str:
    return TRANSFORM_GROUP if i == 0 else f"{TRANSFORM_GROUP}_{i}"


def plan_export(qc: dict, linear_names: list[str]) -> ExportPlan:
    """Map an rsq quantization_config onto compressed-tensors, or raise ExportError saying
    what and why. linear_names: every nn.Linear of the model, to list the float ones as ignored.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if not qc.get("modules"):
        raise ExportError(
            f"the checkpoint has no quantized linears (method {qc.get('method')}): there is "
            "nothing to pack; quantize with --bits 4 or 8 first"
        )
    _refuse_grid(qc)
    transform, modules = _transform_config(qc)
    group = qc["group_size"]
    weights = QuantizationArgs(
        num_bits=qc["bits"],
        type="int",
        symmetric=bool(qc["symmetric"]),
        strategy="channel" if group == -1 else "group",
        group_size=None if group == -1 else group,
        actorder="static" if qc.get("act_order") else None,
    )
    quantized = set(qc["modules"])
    ignore = sorted(n for n in linear_names if n not in quantized)
    return ExportPlan(QuantizationScheme(targets=["Linear"], weights=weights), ignore, transform, modules)


def convert_linear(
    prefix: str, tensors: dict[str, torch.Tensor], in_features: int, qc: dict, scheme
) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one rsq uniform-grid linear (weight_packed, weight_scale,
    weight_shape, and weight_zero_point / bias when present); checks the packed codes against ours
    bit for bit."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from rsq.formats import get_format
    from rsq.quant.pack import unpack_codes

    bits = qc["bits"]
    offset = 1 << (bits - 1)
    codes = unpack_codes(tensors[f"{prefix}.qweight"], bits, in_features)
    codes = codes.to(torch.int16)  # (out, in)
    scales = tensors[f"{prefix}.scales"]  # (out, n_groups)
    zeros = tensors[f"{prefix}.qzeros"].to(torch.int16)  # (out, n_groups)
    if qc["symmetric"] and not bool((zeros == offset).all()):
        raise CheckpointFormatError(
            f"{prefix}: a symmetric grid has zero points other than {offset}: corrupt checkpoint"
        )
    w_hat = get_format("uniform").dequantize(codes, scales, zeros, bits)
    state = {"weight": w_hat, "weight_scale": scales}
    if not qc["symmetric"]:
        state["weight_zero_point"] = (zeros - offset).to(torch.int8)
    out = dict(PackedQuantizationCompressor.compress(state, scheme))
    signed = unpack_from_int32(out["weight_packed"], bits, out["weight_shape"])
    if not torch.equal(signed.to(torch.int16), codes - offset):
        raise RuntimeError(f"{prefix}: compressed-tensors re-quantization changed some codes (float round trip)")
    if f"{prefix}.bias" in tensors:
        out["bias"] = tensors[f"{prefix}.bias"]
    return out


def _meta_model(src: Path):
    """The model skeleton on the meta device (names and shapes only, nothing read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(src))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not a transformers quantizer
    with init_empty_weights(include_buffers=True):
        return AutoModelForCausalLM.from_config(config)


def compressed_state_dict(
    tensors: dict[str, torch.Tensor], qc: dict, plan: ExportPlan, in_features: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The exported tensors: converted quantized linears, everything else unchanged (same dtype),
    and one ±1 Sylvester matrix (float32, the scheme's precision) per online transform, stored once
    at ``<first targeted module>.<group>_input.weight``: that is where a compressed-tensors model
    keeps it, and the later layers' copies are tied to it (deduplicated on save)."""
    quantized = set(qc["modules"])
    out = {name: t for name, t in tensors.items() if name.rsplit(".", 1)[0] not in quantized}
    for prefix in qc["modules"]:
        for key, t in convert_linear(prefix, tensors, in_features[prefix], qc, plan.scheme).items():
            out[f"{prefix}.{key}"] = t.contiguous()
    if plan.transform is not None:
        from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

        for i, (module, scheme) in enumerate(zip(plan.transform_modules, plan.transform.config_groups.values())):
            first = next(m for m in qc["modules"] if m.endswith(f".{module}"))
            key = f"{first}.{_group_name(i)}_input.weight"
            out[key] = deterministic_hadamard_matrix(scheme.head_dim or in_features[first], torch.float32)
    return out


def _write_weights(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        total = sum((out / f).stat().st_size for f in split.filename_to_tensors)
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(config: dict, qc: dict, plan: ExportPlan, out: Path) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    quant = QuantizationConfig(
        config_groups={"group_0": plan.scheme},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=plan.ignore,
    )
    ModelCompressor(quantization_config=quant, transform_config=plan.transform).update_config(str(out))
    provenance = {k: v for k, v in qc.items() if k not in ("modules", "rsq_config")}
    (out / "rsq_export.json").write_text(json.dumps({"format": "compressed-tensors", "source": provenance}, indent=2))


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` onto ``out``, replacing an existing ``out``."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


COMPRESSED_TENSORS_MIN = "0.15.0"  # first with compressors/pack_quantized/helpers.py (unpack_from_int32)


def check_compressed_tensors() -> None:
    """One-line MissingDependencyError when compressed-tensors is missing or older than the floor."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    from rsq.errors import MissingDependencyError

    need = f"rsq export needs compressed-tensors>={COMPRESSED_TENSORS_MIN}"
    try:
        found = version("compressed-tensors")
    except PackageNotFoundError:
        raise MissingDependencyError(f"{need}, which is not installed: pip install 'rsq[export]'") from None
    if Version(found) < Version(COMPRESSED_TENSORS_MIN):
        raise MissingDependencyError(f"{need}, found {found}: pip install -U 'rsq[export]'")


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


def open_export(src: Path, out: Path, overwrite: bool, check=None) -> tuple:
    """(config, quantization_config, {linear name: in_features}) of the checkpoint ``src``, after the
    checks every export makes before writing anything: ``out`` free (or ``overwrite``) and not the
    source, ``check(qc)`` (the format's own refusals), every quantized module a linear of the config."""
    config, qc = read_quant_config(src)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: pass --overwrite to replace it")
    if out.resolve() == src.resolve():
        raise ExportError(f"--out {out} is the source checkpoint: choose another directory")
    if check is not None:
        check(qc)
    model = _meta_model(src)
    linears = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in qc["modules"] if m not in linears]
    if missing:
        raise CheckpointFormatError(f"{src}: quantized modules {missing[:3]} are not linears of the model config")
    return config, qc, linears


def export_compressed_tensors(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``out``: the rsq checkpoint ``src`` in compressed-tensors' pack-quantized format.

    Everything is written into a temporary sibling directory first and renamed onto ``out`` at the
    end, so ``out`` is either absent, the old export, or the complete new one. Returns a summary
    (format, bits, strategy, modules, transforms, bytes written).
    """
    check_compressed_tensors()
    src, out = Path(src), Path(out)
    config, qc, linears = open_export(src, out, overwrite)
    plan = plan_export(qc, sorted(linears))
    if plan.transform is not None:
        log.warning(
            "the export carries an online Hadamard on %s as a compressed-tensors "
            "transform_config: vLLM applies it, transformers %s does not (so its logits are wrong)",
            ", ".join(plan.transform_modules),
            _transformers_version(),
        )
    tensors = compressed_state_dict(_read_tensors(_weight_files(src)), qc, plan, linears)

    from rsq.checkpoint.card import write_model_card

    def write(tmp: Path) -> None:
        _write_weights(tensors, tmp)
        _write_config(config, qc, plan, tmp)
        write_model_card(src, tmp, qc, "compressed-tensors", plan.transform_modules)

    write_export_dir(src, out, write)
    return {
        "format": "compressed-tensors/pack-quantized",
        "bits": qc["bits"],
        "strategy": plan.scheme.weights.strategy,
        "group_size": qc["group_size"],
        "symmetric": bool(qc["symmetric"]),
        "modules": len(qc["modules"]),
        "ignore": plan.ignore,
        "transforms": plan.transform_modules,
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
