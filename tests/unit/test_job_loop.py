"""The layer loop (rsq.job.loop.run_layers) with stand-in collaborators: the order of the calls is
the contract (fetch -> every stage -> store.finish when a stage reported -> store.release ->
weights.release), the stages are prepared once before the first layer and closed even on failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsq.job.loop import run_layers
from rsq.job.stages import Stage
from rsq.job.state import LayerReport, RunState


class Adapter:
    def get_layers(self, model):
        return model.layers


class Model(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))


class Weights:
    streamed, timing_key = False, None

    def __init__(self, log):
        self.log = log

    def fetch(self, index, layer):
        self.log.append(("fetch", index))

    def release(self, index, layer):
        self.log.append(("release", index))

    def close(self):
        self.log.append(("weights.close",))


class Store:
    def __init__(self, log):
        self.log = log

    def finish(self, index, state):
        self.log.append(("finish", index, len(state.layers)))

    def release(self, index, state):
        self.log.append(("store.release", index))

    def drain(self, state=None):
        self.log.append(("drain",))

    def close(self):
        self.log.append(("store.close",))


class Recorder(Stage):
    def __init__(self, name, log, report_from=None, fail_at=None):
        self.name, self.log, self.report_from, self.fail_at = name, log, report_from, fail_at

    def prepare(self, model):
        self.log.append((self.name + ".prepare",))

    def __call__(self, index, layer):
        self.log.append((self.name, index))
        if index == self.fail_at:
            raise RuntimeError("stage failed")
        if self.report_from is not None and index >= self.report_from:
            return LayerReport(index=index, seconds=0.0, losses={})
        return None

    def close(self):
        self.log.append((self.name + ".close",))


def test_the_loop_calls_its_collaborators_in_order():
    log = []
    stages = [Recorder("restore", log), Recorder("quantize", log, report_from=1)]
    state = run_layers(Model(2), Adapter(), Weights(log), stages, Store(log), RunState(), torch.device("cpu"))
    assert log == [
        ("restore.prepare",),
        ("quantize.prepare",),
        ("fetch", 0),
        ("restore", 0),
        ("quantize", 0),
        ("store.release", 0),  # layer 0 reported nothing (a resumed layer): no finish
        ("release", 0),
        ("fetch", 1),
        ("restore", 1),
        ("quantize", 1),
        ("finish", 1, 1),  # the report is in the state before the store saves it
        ("store.release", 1),
        ("release", 1),
        ("drain",),  # after the last layer: its files are on disk before anything else
        ("restore.close",),
        ("quantize.close",),
        ("weights.close",),  # nothing left reading or writing in the background
        ("store.close",),
    ]
    assert [r.index for r in state.layers] == [1]


def test_stages_are_closed_when_a_stage_fails():
    log = []
    stages = [Recorder("a", log, fail_at=1)]
    with pytest.raises(RuntimeError, match="stage failed"):
        run_layers(Model(3), Adapter(), Weights(log), stages, Store(log), RunState(), torch.device("cpu"))
    assert log[-3:] == [("a.close",), ("weights.close",), ("store.close",)]
    assert ("fetch", 2) not in log and ("drain",) not in log  # a failed run is not drained: closed


def test_progress_counts_every_layer():
    seen = []
    run_layers(
        Model(3), Adapter(), Weights([]), [], Store([]), RunState(), torch.device("cpu"), lambda *a: seen.append(a)
    )
    assert seen == [(1, 3, "layer 0"), (2, 3, "layer 1"), (3, 3, "layer 2")]
