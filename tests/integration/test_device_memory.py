"""GPU memory checked before the work (issue 32), on the CPU with a stand-in for the free-memory
query: a job whose predicted device peak exceeds the device's free memory exits 2 with one line
naming options that fit, writes nothing; results.json holds the prediction beside the measurement."""

import json
from dataclasses import replace

import pytest
import torch

import rsq.plan.memory
from rsq.cli.main import main
from rsq.config import CalibConfig, GridConfig, RSQConfig, SolverConfig
from rsq.errors import MemoryBudgetError
from rsq.io.loading import load_config
from rsq.job.run import run_quantize
from rsq.models.registry import resolve
from rsq.plan.memory import DEVICE_MARGIN, JobShape, device_memory_plan, fit_device_memory

CUDA = torch.device("cuda")  # only named: nothing here touches a GPU


@pytest.fixture
def llama(tiny_model_dir, capsys):
    d = str(tiny_model_dir("llama"))
    capsys.readouterr()
    return d


def _cfg(model, **kw):
    return RSQConfig(
        model=model,
        method="gptq",
        grid=GridConfig(bits=3),
        solver=SolverConfig(algorithm="gptq"),
        calib=CalibConfig(nsamples=64, seqlen=64),
        batch_size=8,
        **kw,
    )


def test_refusal_names_options_that_fit(llama, monkeypatch):
    config = load_config(llama)
    adapter, job = resolve(config), JobShape(ppl_seqlen=None, ppl_batch_size=1)
    cfg = _cfg(llama, offload="device")
    need = device_memory_plan(config, adapter, cfg, job)["quantize"]
    offloaded = device_memory_plan(config, adapter, replace(cfg, offload="cpu"), job)["quantize"]
    assert offloaded < need  # the calibration activations (64 x 64 x 64 floats, twice) count on the device
    free = int((need + offloaded) / 2 * DEVICE_MARGIN)  # fits offloaded with the headroom, not need
    monkeypatch.setattr(rsq.plan.memory, "device_free_bytes", lambda device: free)
    with pytest.raises(MemoryBudgetError) as err:
        fit_device_memory(config, adapter, cfg, job, device=CUDA)
    msg = str(err.value)
    assert "on cuda" in msg and "--offload cpu" in msg and "--device cpu" in msg and "\n" not in msg
    # the advice fits: the same job with it passes the check
    record = fit_device_memory(config, adapter, replace(cfg, offload="cpu"), job, device=CUDA)
    assert record["applies"] and record["predicted_peak_GiB"] * DEVICE_MARGIN <= record["free_GiB"]
    # the headroom: free memory just above the prediction is refused, the prediction x DEVICE_MARGIN passes
    monkeypatch.setattr(rsq.plan.memory, "device_free_bytes", lambda device: need + 1)
    with pytest.raises(MemoryBudgetError):
        fit_device_memory(config, adapter, cfg, job, device=CUDA)
    monkeypatch.setattr(rsq.plan.memory, "device_free_bytes", lambda device: int(need * DEVICE_MARGIN) + 1)
    assert fit_device_memory(config, adapter, cfg, job, device=CUDA)["applies"]
    cpu = fit_device_memory(config, adapter, cfg, job, device=torch.device("cpu"))
    assert not cpu["applies"] and cpu["free_GiB"] is None


def test_cli_refuses_before_writing(llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(rsq.plan.memory, "device_free_bytes", lambda device: 1024**2)  # 1 MiB free
    argv = ["quantize", llama, "--device", "cuda", "--nsamples", "4", "--seqlen", "32", "--ppl-seqlen", "32",
            "--max-windows", "2", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsq: error: this job needs about") and "free there" in err[0], err
    assert "--batch-size" in err[0] or "--ppl-batch-size" in err[0] or "more free memory" in err[0], err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_results_hold_predicted_and_measured_device_peak(llama, tmp_path):
    cfg = replace(_cfg(llama), calib=CalibConfig(nsamples=2, seqlen=32))
    res = run_quantize(cfg, tmp_path / "o", ppl_seqlen=32,
                       ppl_max_windows=2)  # fmt: skip
    dev = json.loads((tmp_path / "o" / "results.json").read_text())["device_memory"]
    assert dev == json.loads(json.dumps(res["device_memory"]))
    assert set(dev["stages_GiB"]) == {"quantize", "perplexity"} and dev["predicted_peak_GiB"] > 0
    assert dev["applies"] is False and dev["measured_peak_GiB"] is None  # on the CPU: no device measurement
