"""Data-parallel calibration over 2 gloo processes on CPU equals the 1-process run; a killed rank
gives a clear error and a resumable state, not a hang."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rsq.config import (
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(model_dir):
    # float64 Hessian accumulation: the 2-rank sum differs from the 1-rank sum only in the order of
    # float64 additions (~1e-16 relative), which vanishes when H is cast to float32 for the solve
    return RSQConfig(
        model=str(model_dir),
        method="rsq",
        grid=GridConfig(bits=3),
        solver=SolverConfig(hessian_dtype="float64"),
        rotation=RotationConfig(enabled=False),
        importance=ImportanceConfig(strategy="attncon"),
        calib=CalibConfig(nsamples=6, seqlen=64),
        batch_size=2,
        device="cpu",
    )


def _rank_main(rank, world, port, model_dir, out, kill_after):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    from rsq.distributed import DistributedError, init_from_env, shutdown
    from rsq.job.run import _Interrupted, run_quantize

    ctx = init_from_env("cpu", timeout_s=60)
    status = "done"
    try:
        run_quantize(
            _cfg(model_dir), out, ppl_sources=(), dist_ctx=ctx, stop_after_layer=kill_after if rank == 1 else None
        )
    except _Interrupted:
        os._exit(3)  # the killed rank vanishes without a goodbye
    except DistributedError as exc:
        status = f"DistributedError: {exc}"
    with open(f"{out}.rank{rank}", "w") as f:
        f.write(status)
    if status == "done":
        shutdown(ctx)


def _spawn(world, model_dir, out, kill_after=None):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, str(model_dir), str(out), kill_after))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert not p.is_alive(), "a rank hung"
    return procs


def _weights(out):
    return load_file(str(next(out.glob("*.safetensors"))))


def test_two_ranks_equal_one(tiny_model_dir, tmp_path):
    from rsq.job.run import run_quantize

    model_dir = tiny_model_dir("llama")
    run_quantize(_cfg(model_dir), tmp_path / "one", ppl_sources=())
    procs = _spawn(2, model_dir, tmp_path / "two")
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "two" / "results.json").read_text())["ranks"] == 2


def test_killed_rank_gives_error_and_resumable_state(tiny_model_dir, tmp_path):
    from rsq.job.run import partial_dir, run_quantize

    model_dir = tiny_model_dir("llama")
    out = tmp_path / "killed"
    procs = _spawn(2, model_dir, out, kill_after=0)
    assert procs[1].exitcode == 3
    status = (tmp_path / "killed.rank0").read_text()
    assert status.startswith("DistributedError") and "--resume" in status
    state = json.loads((partial_dir(out) / "state.json").read_text())
    assert state["finished_layers"] >= 1
    # the run continues (here on one process) and equals an uninterrupted run
    run_quantize(_cfg(model_dir), out, ppl_sources=(), resume=True)
    run_quantize(_cfg(model_dir), tmp_path / "ref", ppl_sources=())
    a, b = _weights(out), _weights(tmp_path / "ref")
    for k in a:
        assert torch.equal(a[k], b[k]), k
