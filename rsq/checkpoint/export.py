"""Export an rsq checkpoint directory to compressed-tensors' ``pack-quantized`` layout (what vLLM's
``CompressedTensorsWNA16`` scheme and transformers' compressed-tensors quantizer read), at 2, 3, 4 and
8 bits. Registered as ``compressed-tensors`` in rsq/checkpoint/exporters.py.

What maps, per quantized linear (rsq/checkpoint/schema.py is our side of the contract):

    rsq                           compressed-tensors ("pack-quantized", int weights)
    code c in [0, 2^b - 1]        q = c - 2^(b-1) in [-2^(b-1), 2^(b-1) - 1]
    zero z                        zp = z - 2^(b-1)    (none stored when symmetric: z = 2^(b-1))
    w_hat = scales * (c - z)      w = weight_scale * (q - zp)
    group_size -1 / g             strategy "channel" / "group" with group_size g
    act_order (static groups)     nothing: codes and groups are in natural column order already

The tensors: ``weight_packed`` int32 (out, ceil(in * b / 32)), the unsigned codes q + 2^(b-1) as
one dense little-endian bit stream per output row (32 codes in exactly b words; at 3 bits codes
straddle words), which is rsq's own qweight layout (rsq/quant/pack.py) bit for bit;
``weight_scale`` (out, groups); ``weight_shape`` int (2,) = (out, in); asymmetric only:
``weight_zero_point`` int32 (ceil(out * b / 32), groups), zp + 2^(b-1) packed the same way along
the output dim. The dense stream is compressed-tensors >= 0.18 (0.17 and older pad each int32 to
floor(32 / b) codes: the same words at 2/4/8 bits, different ones at 3), which is why the export
needs 0.18; vLLM reads the packed width as ceil(in * b / 32) and unpacks the same stream.

The packed tensors are produced by compressed-tensors' own ``PackedQuantizationCompressor`` from
W_hat, then unpacked again and compared with our codes bit for bit (a float round trip that went
one code off would raise here rather than ship a different model).

Refused before anything is written, with :class:`ExportError` naming what would work: grids other
than uniform (the format's ``exports``), widths other than 2/3/4/8, and an online rotation that
compressed-tensors' ``transform_config`` cannot reproduce exactly. Its ``hadamard`` transform is
Sylvester's matrix (power-of-2 orders) over the whole input or over contiguous ``head_dim`` blocks.
So the ``block`` site of ``--online-rotations export`` is a ``hadamard`` transform with
``head_dim`` = its block, and a ``full`` site whose matrix is Sylvester's an ``input`` transform on
the same module; rsq's non-power-of-2 Hadamards (e.g. paley1(q=11) ⊗ sylvester(128) for SmolLM2's
1536), cross-head rotations (H_heads ⊗ I_head_dim, a strided layout) and seeded random orthogonal
matrices are refused. Rotations fused into the weights (the residual R1, the per-head v/o
Hadamard) need nothing at run time and export as plain weights.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rsq.checkpoint.card import write_model_card
from rsq.checkpoint.exporters import open_export, runtime_sites, write_export_dir, write_provenance, write_weights
from rsq.checkpoint.load import read_checkpoint_tensors
from rsq.errors import CheckpointFormatError, ExportError, MissingDependencyError
from rsq.formats import get_format
from rsq.quant.pack import unpack_codes
from rsq.rotation.hadamard import hadamard_matrix

log = logging.getLogger(__name__)

NAME = "compressed-tensors"  # the exporter's name in rsq/checkpoint/exporters.py
# compressed-tensors transform scheme name; also the middle of the transform weight's tensor key
TRANSFORM_GROUP = "rsq_online_hadamard"
COMPRESSED_TENSORS_MIN = "0.18.0"  # first whose pack_to_int32 writes the dense bit stream vLLM reads


@dataclass(frozen=True)
class ExportPlan:
    """What the export writes: one quantization scheme for all quantized linears, the linears
    left in float (``ignore``), and the online transforms (None when there are none)."""

    scheme: object  # compressed_tensors.quantization.QuantizationScheme
    ignore: list[str]
    transform: object | None  # compressed_tensors.transform.TransformConfig
    transform_modules: list[str]  # module suffixes inside a layer that get an input transform


def _sylvester_site(site: dict) -> bool:
    """True when a ``full`` site's matrix is exactly compressed-tensors' ``hadamard`` one."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix, is_pow2

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


def check_sites(qc: dict) -> None:
    """ExportError unless every run-time rotation site is one compressed-tensors' ``hadamard``
    transform reproduces (the exporter's own check, after rsq/checkpoint/exporters.py's)."""
    for site in runtime_sites(qc):
        if site["kind"] != "block" and not _sylvester_site(site):
            raise _refuse_site(site)


def _transform_config(qc: dict):
    """(TransformConfig | None, module suffixes) for the online rotation sites, or ExportError."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    check_sites(qc)
    sites = runtime_sites(qc)
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
    write_provenance(out, NAME, qc)


def check_compressed_tensors() -> None:
    """One-line MissingDependencyError when compressed-tensors is missing or older than the floor."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    need = f"rsq export needs compressed-tensors>={COMPRESSED_TENSORS_MIN} (its dense bit-stream packing)"
    try:
        found = version("compressed-tensors")
    except PackageNotFoundError:
        raise MissingDependencyError(f"{need}, which is not installed: pip install 'rsq[export]'") from None
    if Version(found) < Version(COMPRESSED_TENSORS_MIN):
        raise MissingDependencyError(f"{need}, found {found}: pip install -U 'rsq[export]'")


def export_compressed_tensors(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``out``: the rsq checkpoint ``src`` in compressed-tensors' pack-quantized format.

    Everything is written into a temporary sibling directory first and renamed onto ``out`` at the
    end, so ``out`` is either absent, the old export, or the complete new one. Returns a summary
    (format, bits, strategy, modules, transforms, bytes written).
    """
    check_compressed_tensors()
    src, out = Path(src), Path(out)
    config, qc, linears = open_export(src, out, overwrite, NAME)
    plan = plan_export(qc, sorted(linears))
    if plan.transform is not None:
        log.warning(
            "the export carries an online Hadamard on %s as a compressed-tensors "
            "transform_config: vLLM applies it, transformers %s does not (so its logits are wrong)",
            ", ".join(plan.transform_modules),
            _transformers_version(),
        )
    tensors = compressed_state_dict(read_checkpoint_tensors(src), qc, plan, linears)

    def write(tmp: Path) -> None:
        write_weights(tensors, tmp)
        _write_config(config, qc, plan, tmp)
        write_model_card(src, tmp, qc, NAME, plan.transform_modules, name=out.name)

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
