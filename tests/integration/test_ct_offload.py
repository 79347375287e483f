"""`rsq eval OUT --device cuda` of a compressed-tensors export (issue 32). Under transformers 5.17
(the GPU machine's) the dequantize route decompresses through compressed-tensors'
``ModelCompressor.decompress_model``, whose first step, ``from_accelerate``, makes every module of
the CPU-loaded model an offloaded one with onload device CPU: ``model.to("cuda")`` then moves nothing
and every forward runs on the CPU, so the logits came back on the CPU beside CUDA targets. Simulated
here on the CPU (that step applied to the loaded model); scripts/gpu_checks.sh checks it on a GPU."""

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.offload import from_accelerate  # noqa: E402
from compressed_tensors.offload.cache import OffloadCache  # noqa: E402

from rsq.checkpoint.export import export_compressed_tensors  # noqa: E402
from rsq.config import CalibConfig, GridConfig, RSQConfig  # noqa: E402
from rsq.io.loading import load_model  # noqa: E402
from rsq.job.run import run_quantize  # noqa: E402


def test_compressed_tensors_export_loads_without_offloading(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    src = str(tiny_model_dir("llama"))
    cfg = RSQConfig(model=src, method="gptq", grid=GridConfig(bits=4), calib=CalibConfig(nsamples=2, seqlen=32))
    run_quantize(cfg, tmp_path / "ckpt", ppl_sources=())
    export_compressed_tensors(tmp_path / "ckpt", tmp_path / "ct")

    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def as_in_5_17(cls, *args, **kw):  # what decompress_model does first, there
        net = real(cls, *args, **kw)
        from_accelerate(net)
        assert any(isinstance(m._parameters, OffloadCache) for m in net.modules())  # the stand-in took
        return net

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(as_in_5_17))
    net, _ = load_model(str(tmp_path / "ct"))
    assert not any(isinstance(m._parameters, OffloadCache) for m in net.modules())
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = net(input_ids=ids).logits
    net.to("meta")  # a device move reaches every parameter again (stands for .to("cuda"))
    assert {p.device.type for p in net.parameters()} == {"meta"}
    assert torch.isfinite(before).all()
