"""Rotation preserves the function: logits of the rotated model equal the original's."""

import copy

import pytest
import torch

from rsq.config import RotationConfig
from rsq.models.registry import resolve
from rsq.rotation import rotate_model
from tests.conftest import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _exact_norms(model):
    """HF's RMSNorm computes in float32 even in a float64 model (a 1e-7 floor); for the exactness
    check every norm runs in float64 instead (same formula), in both models alike."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):

            def forward(x, m=module):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))

            module.forward = forward
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fallback", ["skip", "random"])
def test_rotation_preserves_logits_float64(family, fallback):
    model = tiny_model(family, dtype=torch.float64)
    ids = torch.randint(0, 512, (2, 48))
    ref = _logits(model, ids)
    rotated = copy.deepcopy(model)
    record = rotate_model(rotated, resolve(rotated), RotationConfig(enabled=True, seed=3, fallback=fallback))
    out = _logits(rotated, ids)
    # HF norms as they are (float32 inside): the bound, 1e-6 relative
    assert (out - ref).abs().max() / ref.abs().max() < 1e-6, record
    # float64 end to end: only rounding of O(depth * width) float64 products remains
    ref64, out64 = _logits(_exact_norms(model), ids), _logits(_exact_norms(rotated), ids)
    assert (out64 - ref64).abs().max() / ref64.abs().max() < 1e-12, record
    # the weights really changed
    assert not torch.allclose(
        rotated.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_rotation_preserves_logits_float32(family):
    model = tiny_model(family, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 48))
    ref = _logits(model, ids)
    rotate_model(model, resolve(model), RotationConfig(enabled=True, seed=0))
    out = _logits(model, ids)
    # float32 rounding of the rotated weights (computed in float64, cast once): ~1e-6 relative
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize(
    "setting,down,o_proj",
    [("exact", "full", "cross_head"), (None, "block", "skipped")],  # None: the default, --online-rotations export
)
def test_rotation_record_and_untie(setting, down, o_proj):
    model = tiny_model("llama", dtype=torch.float64)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = RotationConfig(enabled=True) if setting is None else RotationConfig(enabled=True, online=setting)
    record = rotate_model(model, resolve(model), cfg)
    assert record["untied_embeddings"] is True
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    kinds = {r["module"]: r["kind"] for r in record["online"]}
    assert kinds == {"mlp.down_proj": down, "self_attn.v_proj": "per_head", "self_attn.o_proj": o_proj}


def test_qwen_seven_heads_cross_head_skipped_or_random():
    model = tiny_model("qwen2", dtype=torch.float64)
    record = rotate_model(model, resolve(model), RotationConfig(enabled=True, online="exact"))
    o = [r for r in record["online"] if r["module"] == "self_attn.o_proj"][0]
    assert o["kind"] == "skipped" and "7" in o["reason"]
    model = tiny_model("qwen2", dtype=torch.float64)
    record = rotate_model(model, resolve(model), RotationConfig(enabled=True, online="exact", fallback="random"))
    o = [r for r in record["online"] if r["module"] == "self_attn.o_proj"][0]
    assert o["kind"] == "random_cross_head"


def test_seed_changes_rotation_and_is_reproducible():
    a, b, c = (tiny_model("llama", dtype=torch.float64) for _ in range(3))
    for m, seed in ((a, 1), (b, 1), (c, 2)):
        rotate_model(m, resolve(m), RotationConfig(enabled=True, seed=seed))
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("setting", ["exact", "export", "none"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_every_online_setting_keeps_the_function(family, setting):
    import copy

    from rsq.config import RotationConfig
    from rsq.models.registry import resolve
    from rsq.rotation import rotate_model
    from tests.conftest import tiny_model

    ref = tiny_model(family, dtype=torch.float64)
    rot = copy.deepcopy(ref)
    _exact_norms(ref), _exact_norms(rot)
    record = rotate_model(rot, resolve(rot), RotationConfig(enabled=True, online=setting))
    assert record["online_setting"] == setting
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rot(input_ids=ids).logits
    # float64 rounding of a few products of width <= 152 only
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10
    attached = {type(m).__name__ for m in rot.modules() if hasattr(m, "online_rotation")}
    kinds = {m.online_rotation.spec.kind for m in rot.modules() if hasattr(m, "online_rotation")}
    if setting == "none":
        assert not attached
    elif setting == "export":
        assert kinds == {"block"}


@pytest.mark.parametrize("family,block", [("llama", 48), ("llama", 96), ("qwen2", 76), ("qwen2", 152)])
def test_non_pow2_export_block_keeps_the_function(family, block):
    """--online-rotations export --export-block b (b not a power of two: 48 = 12·4, 96 = 12·8 of the
    tiny Llama's 96; 76 = 76·1, 152 = 76·2 of the tiny Qwen2's 152 = 8·19, whose auto block is 8):
    the rotated float64 model computes the original's logits (same bound as above), the site is the
    block of b, and its online transform is the explicit block-diagonal I ⊗ H_b/√b."""
    from rsq.rotation.hadamard import hadamard_matrix

    ref = tiny_model(family, dtype=torch.float64)
    rot = copy.deepcopy(ref)
    _exact_norms(ref), _exact_norms(rot)
    record = rotate_model(rot, resolve(rot), RotationConfig(enabled=True, online="export", export_block=block))
    down = next(r for r in record["online"] if r["module"] == "mlp.down_proj")
    width = ref.config.intermediate_size
    assert (down["kind"], down["size"], down["head_dim"]) == ("block", width, block)
    assert down["recipe"].endswith(f" x {width // block}")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, rot(input_ids=ids).logits
    assert ((a - b).abs().max() / a.abs().max()).item() < 1e-10
    site = rot.model.layers[0].mlp.down_proj.online_rotation
    x = torch.randn(3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dense = torch.block_diag(*[hadamard_matrix(block) / block**0.5] * (width // block))
    assert torch.allclose(site(x), x @ dense.T, rtol=0, atol=1e-12)  # float64 sums of <= 152 products
