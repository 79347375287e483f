"""RSQConfig.for_method is the only home of the method presets; contradictory configs are refused."""

import pytest

from rsq.config import PRESETS, GridConfig, ImportanceConfig, RotationConfig, RSQConfig, SolverConfig
from rsq.errors import ConfigError


@pytest.mark.parametrize("method", list(PRESETS))
def test_presets(method):
    cfg = RSQConfig.for_method(method)
    preset = PRESETS[method]
    assert cfg.method == method
    assert cfg.rotation.enabled is preset["rotate"]
    assert cfg.importance.strategy == preset["importance"]
    assert cfg.solver.algorithm == ("rtn" if method == "rtn" else "gptq")


def test_the_format_picks_the_solver_and_the_bits():
    cfg = RSQConfig.for_method("rsq", grid={"kind": "e8p"})
    assert cfg.solver.algorithm == "ldlq" and cfg.grid.bits == 2
    assert RSQConfig.for_method("rtn", grid={"kind": "e8p"}).solver.algorithm == "rtn"


def test_overrides_keep_the_rest_of_the_preset():
    cfg = RSQConfig.for_method(
        "rsq", grid={"bits": 4}, importance={"r_min": 0.1}, rotation={"seed": 5}, calib={"nsamples": 3}, seed=2
    )
    assert (cfg.grid.bits, cfg.importance.r_min, cfg.importance.strategy) == (4, 0.1, "attncon")
    assert (cfg.rotation.seed, cfg.rotation.enabled, cfg.calib.nsamples, cfg.seed) == (5, True, 3, 2)
    # a finished dataclass is taken as is
    g = GridConfig(bits=8, symmetric=False)
    assert RSQConfig.for_method("gptq", grid=g).grid is g


def test_ablations_stay_expressible():
    assert not RSQConfig.for_method("rsq", rotation={"enabled": False}).rotation.enabled  # rsq without rotation
    assert RSQConfig.for_method("rtn", rotation={"enabled": True}).rotation.enabled  # QuaRot-RTN
    assert RSQConfig.for_method("rsq", importance={"strategy": "actnorm"}).importance.strategy == "actnorm"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="rsq"), "importance.strategy is 'uniform'"),
        (dict(method="rsq", rotation=RotationConfig(enabled=True)), "importance.strategy is 'uniform'"),
        (dict(method="quarot"), "rotation.enabled is False"),
        (dict(method="gptq", rotation=RotationConfig(enabled=True)), "rotation.enabled is True"),
        (dict(method="gptq", importance=ImportanceConfig(strategy="attncon")), "token importance"),
        (dict(method="rtn"), "rtn rounds to nearest"),
        (dict(method="gptq", solver=SolverConfig(algorithm="rtn")), "that is --method rtn"),
        (dict(method="gptq", grid=GridConfig(kind="e8p", bits=2)), "solved by ldlq"),
        (dict(method="gptq", solver=SolverConfig(algorithm="ldlq")), "solved by gptq"),
    ],
)
def test_contradictions_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match) as err:
        RSQConfig(**kwargs)
    assert "for_method" in str(err.value)


def test_default_config_is_consistent_plain_gptq():
    cfg = RSQConfig()
    assert (cfg.method, cfg.rotation.enabled, cfg.importance.strategy) == ("gptq", False, "uniform")
    assert RSQConfig.from_dict(RSQConfig.for_method("rsq").to_dict()) == RSQConfig.for_method("rsq")


def test_kernels_field():
    assert RSQConfig.for_method("rsq", kernels="reference").kernels == "reference"
    with pytest.raises(ConfigError, match="unknown kernels"):
        RSQConfig.for_method("rsq", kernels="cuda")


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown method 'awq'"):
        RSQConfig.for_method("awq")
