"""`rsq longctx --dense`: packed linears replaced by dense ones compute the same function.

Oracle: the checkpoint loaded as is (QuantLinear through the reference kernel, online Hadamard
pre-hooks) on the same input. Both sides use W_hat dequantized in float32 from the same codes, so
only the matmul call differs (float32 rounding).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import rsq
from rsq.checkpoint.dense import dequantize_once
from rsq.cli.cmd_eval import add_parsers
from rsq.config import (
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)
from rsq.formats.uniform import QuantLinear
from rsq.io.loading import load_model
from rsq.job.run import run_quantize


def _quarot_checkpoint(model_dir, out):
    cfg = RSQConfig(
        model=str(model_dir),
        method="quarot",
        grid=GridConfig(bits=3),
        solver=SolverConfig(),
        rotation=RotationConfig(enabled=True),
        importance=ImportanceConfig(strategy="uniform"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
    )
    run_quantize(cfg, out, ppl_sources=(), preloaded=load_model(str(model_dir)))
    return out


def test_dense_linears_keep_the_function_and_the_online_rotation(tiny_model_dir, tmp_path):
    ckpt = _quarot_checkpoint(tiny_model_dir("llama"), tmp_path / "ckpt")
    packed, _ = rsq.load(ckpt)
    dense = copy.deepcopy(packed)
    assert dequantize_once(dense, keep_packed=False) == 2 * 7
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    down = dense.model.layers[0].mlp.down_proj
    assert type(down) is torch.nn.Linear and hasattr(down, "online_rotation")
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ref, got = packed(input_ids=ids).logits, dense(input_ids=ids).logits
    assert (got - ref).abs().max() / ref.abs().max() < 1e-5
    assert dequantize_once(dense, keep_packed=False) == 0  # nothing left to replace


def test_cli_longctx_dense_gives_the_same_answers(tiny_model_dir, tmp_path):
    ckpt = _quarot_checkpoint(tiny_model_dir("llama"), tmp_path / "ckpt")
    parser = argparse.ArgumentParser(prog="rsq")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    outputs = {}
    for flag in ([], ["--dense"]):
        out = tmp_path / f"longctx{len(flag)}.json"
        args = parser.parse_args(
            [
                "longctx",
                str(ckpt),
                "--lines",
                "3",
                "--positions",
                "start,end",
                "--samples",
                "2",
                "--device",
                "cpu",
                "--max-new-tokens",
                "5",
                "--json-out",
                str(out),
                *flag,
            ]
        )
        assert args.func(args) == 0
        examples = json.loads(out.read_text())["tasks"]["lines"]["examples"]
        outputs[len(flag)] = [e["output"] for e in examples]
    assert len(outputs[0]) == 4 and outputs[0] == outputs[1]
