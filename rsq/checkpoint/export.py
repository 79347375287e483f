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
``head_dim`` = its block when the block is a power of two (vLLM runs it with its Hadacore kernel),
and a ``full`` site whose matrix is Sylvester's an ``input`` transform on the same module.

A block of another order (``--export-block``, e.g. 768 = 12 x 64: rsq's H_b = H_K ⊗ sylvester, H_K
a Paley or Goethals-Seidel core, not symmetric) is a ``random-hadamard`` transform with the same
``head_dim`` whose matrix is the one stored in the checkpoint: vLLM applies every type other than
``hadamard`` as a dense b x b GEMM per block with the stored matrix (divided by sqrt(b) at load,
vllm/model_executor/layers/quantization/compressed_tensors/transform/module.py); compressed-tensors'
``apply_transform_config`` builds its own random-signed matrix of that order (orders K·2^j with K
in its hadamards.safetensors: 1, 2 and the multiples of 4 up to 256; other orders are refused), which
the loader must then overwrite with the stored one (:func:`load_transform_weights`; transformers
5.x ignores ``transform_config`` and drops the stored tensor). Orientation: both apply y = x W / sqrt(b)
per block (compressed-tensors ``x @ W``; vLLM ``F.linear(x, W.T)``), and rsq's block transform is
y = x H_bᵀ / sqrt(b), so the stored matrix is H_bᵀ (for Sylvester's H_b, symmetric, the same).

rsq's other non-power-of-2 Hadamards (e.g. paley1(q=11) ⊗ sylvester(128) for SmolLM2's full 1536 of
``--online-rotations exact``), cross-head rotations (H_heads ⊗ I_head_dim, a strided layout) and
seeded random orthogonal matrices are refused. Rotations fused into the weights (the residual R1,
the per-head v/o Hadamard) need nothing at run time and export as plain weights.
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
# the transform type of a non-power-of-2 block: applied with the stored matrix (module docstring)
DENSE_TYPE = "random-hadamard"


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


def _block_type(block: int) -> str:
    """The compressed-tensors transform type of a ``block`` site: Sylvester's ``hadamard`` for a
    power of two, else :data:`DENSE_TYPE` (its matrix stored in the export)."""
    return "hadamard" if block & (block - 1) == 0 else DENSE_TYPE


def _ct_builds(n: int) -> bool:
    """True when compressed-tensors can build a ``random-hadamard`` matrix of order n (it must, to
    attach the transform before the stored matrix overwrites it): n = K·2^j with K one of its
    stored core orders. Asked of compressed-tensors' own table."""
    from compressed_tensors.transform.utils import hadamard as ct_hadamard

    fetch = getattr(ct_hadamard, "_fetch_hadamard_divisor", None)
    if fetch is None:  # a compressed-tensors without the table function: its builder decides at load
        return True
    return fetch(n, torch.float32) is not None


def check_sites(qc: dict) -> None:
    """ExportError unless every run-time rotation site is one a compressed-tensors transform
    reproduces (the exporter's own check, after rsq/checkpoint/exporters.py's)."""
    for site in runtime_sites(qc):
        if site["kind"] == "block":
            block = site["head_dim"]
            if _block_type(block) == DENSE_TYPE and not _ct_builds(block):
                raise ExportError(
                    f"online rotation at {site['module']} input (block, order {block}): compressed-tensors "
                    f"cannot build a {DENSE_TYPE} transform of order {block} (orders K x 2^j, K <= 256), so no "
                    "loader could attach it; re-quantize with another --export-block (0 = the largest power of "
                    "two) or --online-rotations none"
                )
        elif not _sylvester_site(site):
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
        # a block site (--online-rotations export) is H_b on contiguous blocks of b: Sylvester's
        # "hadamard" for a power of two, else a dense type whose stored matrix the engines apply
        block = site.get("head_dim") if site["kind"] == "block" else None
        kind = _block_type(block) if block else "hadamard"
        groups[_group_name(i)] = TransformScheme(type=kind, apply=[args], head_dim=block)
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


def transform_matrix(scheme, size: int) -> torch.Tensor:
    """The ±1 matrix W (float32) stored for a transform ``scheme`` of order ``size``: the engines
    compute x W / sqrt(size) per block. Sylvester's for ``hadamard`` (compressed-tensors' own, as
    before); else rsq's H_bᵀ, so that x W / sqrt(b) = x H_bᵀ / sqrt(b) is rsq's block transform."""
    if scheme.type == "hadamard":
        from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

        return deterministic_hadamard_matrix(size, torch.float32)
    return hadamard_matrix(size).T.to(torch.float32).contiguous()


def compressed_state_dict(
    tensors: dict[str, torch.Tensor], qc: dict, plan: ExportPlan, in_features: dict[str, int]
) -> dict[str, torch.Tensor]:
    """The exported tensors: converted quantized linears, everything else unchanged (same dtype),
    and one ±1 matrix (float32, the scheme's precision; :func:`transform_matrix`) per online
    transform, stored once at ``<first targeted module>.<group>_input.weight``: that is where a
    compressed-tensors model keeps it, and the later layers' copies are tied to it (deduplicated on
    save; vLLM shares one tensor across layers per scheme and order)."""
    quantized = set(qc["modules"])
    out = {name: t for name, t in tensors.items() if name.rsplit(".", 1)[0] not in quantized}
    for prefix in qc["modules"]:
        for key, t in convert_linear(prefix, tensors, in_features[prefix], qc, plan.scheme).items():
            out[f"{prefix}.{key}"] = t.contiguous()
    if plan.transform is not None:
        for i, (module, scheme) in enumerate(zip(plan.transform_modules, plan.transform.config_groups.values())):
            first = next(m for m in qc["modules"] if m.endswith(f".{module}"))
            key = f"{first}.{_group_name(i)}_input.weight"
            out[key] = transform_matrix(scheme, scheme.head_dim or in_features[first])
    return out


def _weight_files(model: str) -> list[Path]:
    """The safetensors files of a local model directory or of a hub id already in the cache."""
    p = Path(model)
    if p.is_dir():
        return sorted(p.glob("*.safetensors"))
    from transformers.utils import cached_file

    index = cached_file(model, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        return [Path(cached_file(model, n)) for n in names]
    return [Path(cached_file(model, "model.safetensors"))]


def load_transform_weights(net: torch.nn.Module, model: str) -> list[str]:
    """Overwrite the matrices of the compressed-tensors transforms that ``apply_transform_config``
    attached to ``net`` with the ones stored in the export ``model`` (a directory or cached hub id),
    for every type but ``hadamard`` (Sylvester's, which compressed-tensors builds exactly and vLLM
    runs with Hadacore regardless of the stored tensor): compressed-tensors builds a
    ``random-hadamard`` matrix from fresh random signs, and transformers drops the stored tensor
    (it does not apply ``transform_config``). Returns the transform module names overwritten;
    CheckpointFormatError when a matrix is missing or has the wrong shape."""
    from compressed_tensors.transform.factory.base import TransformBase
    from safetensors import safe_open

    targets = {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, TransformBase) and getattr(m, "scheme", None) is not None and m.scheme.type != "hadamard"
    }
    if not targets:
        return []
    stored = {}
    for f in _weight_files(model):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("_input.weight") or key.endswith("_output.weight"):
                    stored[key.rsplit(".", 2)[-2]] = st.get_tensor(key)  # by "<group>_<location>"
    done = []
    for name, module in targets.items():
        group = name.rsplit(".", 1)[-1]
        matrix = stored.get(group)
        if matrix is None or matrix.shape != module.weight.shape:
            got = "missing" if matrix is None else f"shaped {tuple(matrix.shape)}"
            raise CheckpointFormatError(
                f"{model}: the {module.scheme.type} transform {group} needs its stored "
                f"{tuple(module.weight.shape)} matrix, which is {got}: re-export the checkpoint with rsq export"
            )
        with torch.no_grad():
            module.weight.data = matrix.to(module.weight.dtype).to(module.weight.device)
        done.append(name)
    return done


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
