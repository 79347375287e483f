"""rsq.calib.capture.ActivationStore's finiteness check: noted per batch on the device, raised once
per pass by check() (no host sync per batch), for every location."""

import pytest
import torch

from rsq.calib.capture import ActivationStore, capture_layer0_inputs
from rsq.errors import CalibrationError
from tests.conftest import tiny_model


@pytest.mark.parametrize("location", ["cpu", "disk"])
def test_a_nan_batch_is_raised_by_the_next_check_only(location):
    store = ActivationStore(6, 4, 3, torch.float32, torch.device("cpu"), location)
    good = torch.ones(2, 4, 3)
    bad = good.clone()
    bad[1, 2, 0] = float("nan")
    store.set(0, 2, good)
    store.check()  # all finite: nothing
    store.set(2, 4, bad)  # noted, not raised: the pass goes on
    store.set(4, 6, good)
    assert torch.isnan(store.get(2, 4)).any()  # written as given
    with pytest.raises(CalibrationError, match="NaN/Inf in calibration activations"):
        store.check()
    store.check()  # the flag is per pass: cleared by the check that raised
    store.set(0, 2, torch.full((2, 4, 3), float("inf")))
    with pytest.raises(CalibrationError):
        store.check()
    store.close()


def test_unchecked_store_keeps_nan():
    store = ActivationStore(2, 4, 3, torch.float32, torch.device("cpu"), "cpu", check_finite=False)
    store.set(0, 2, torch.full((2, 4, 3), float("nan")))
    store.check()
    assert torch.isnan(store.get(0, 2)).all()


def test_capture_of_non_finite_inputs_fails_once_filled():
    model = tiny_model("llama", layers=1)
    model.model.embed_tokens.weight.data[7] = float("inf")
    store = ActivationStore(4, 8, model.config.hidden_size, torch.float32, torch.device("cpu"), "cpu")
    windows = torch.arange(32).reshape(4, 8)  # token 7 is in the first window
    with pytest.raises(CalibrationError, match="--dtype float32"):
        capture_layer0_inputs(model, model.model.layers, windows, store, 2, torch.device("cpu"))
