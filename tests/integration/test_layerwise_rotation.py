"""The pipeline rotates each layer at its turn (on the calibration device) instead of the whole
model first: the quantized model must be bit-identical to rotate-everything-then-quantize."""

import copy

import pytest
import torch

from rsq.config import RSQConfig
from rsq.importance.layer import make_weight_fn
from rsq.job.loop import quantize_layers
from rsq.models.registry import resolve
from rsq.rotation import rotate_model
from rsq.rotation.rotate import plan_rotation
from tests.conftest import tiny_model


@pytest.mark.parametrize(
    "family,online,block",
    # block: --export-block (0 = auto); 48 = paley1(q=11) ⊗ sylvester(4) blocks of the tiny Llama's 96
    [("llama", "exact", 0), ("qwen2", "exact", 0), ("mistral", "export", 0), ("llama", "export", 48)],
)
def test_layerwise_rotation_equals_whole_model_rotation(family, online, block):
    cfg = RSQConfig.for_method(
        "rsq",
        rotation={"online": online, "export_block": block},
        calib={"nsamples": 4, "seqlen": 32},
        batch_size=2,
        device="cpu",
    )
    windows = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    base = tiny_model(family)
    whole, layerwise = copy.deepcopy(base), copy.deepcopy(base)
    adapter = resolve(base)

    record = rotate_model(whole, adapter, cfg.rotation)
    quantize_layers(whole, cfg, windows, adapter=adapter, weight_fn=make_weight_fn(cfg, adapter, base.config, windows))

    plan = plan_rotation(layerwise, adapter, cfg.rotation)
    fn = make_weight_fn(cfg, adapter, base.config, windows)
    quantize_layers(layerwise, cfg, windows, adapter=adapter, weight_fn=fn, rotation=plan)

    assert plan.record == record
    a, b = whole.state_dict(), layerwise.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = windows[:1]
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, layerwise(input_ids=ids).logits)
