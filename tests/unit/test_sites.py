"""rsq.importance.sites.InputStats (issue 33) against a naive per-element oracle."""

import math

import pytest
import torch

from rsq.config import ImportanceConfig
from rsq.errors import ConfigError
from rsq.importance.sites import InputStats


def _naive(batches):
    """channel_peak, token_norm, channel from nested Python loops over every token."""
    tokens = [row for x in batches for row in x.reshape(-1, x.shape[-1]).tolist()]
    d = len(tokens[0])
    peaks = [max(abs(t[j]) for t in tokens) for j in range(d)]
    norms = [math.sqrt(sum(v * v for v in t)) for t in tokens]
    # torch.median of an even count is the lower middle value: the oracle takes the same element
    lower = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # noqa: E731
    return max(peaks) / lower(peaks), max(norms) / lower(norms), peaks.index(max(peaks))


@pytest.mark.parametrize("d", [7, 8])
def test_stats_match_naive_oracle_over_batches(d):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, d, generator=g) for _ in range(3)]
    batches[1][1, 3, d - 2] = -250.0  # one token's massive activation, in one channel, a middle batch
    stats = InputStats()
    for x in batches:
        stats.add(x)
    got = stats.summary()
    peak, norm, channel = _naive(batches)
    # float32 sums of squares and a division: 1e-5 relative
    assert got["channel_peak"] == pytest.approx(peak, rel=1e-5)
    assert got["token_norm"] == pytest.approx(norm, rel=1e-5)
    assert got["channel"] == channel == d - 2
    assert got["channel_peak"] > 50  # the planted activation stands out; without it it would not:
    calm = InputStats()
    for x in batches[:1]:
        calm.add(x)
    assert calm.summary()["channel_peak"] < 10


def test_rotation_spreads_the_peak_but_not_the_token_norm():
    """A Hadamard rotation of the input spreads one massive channel over all channels (channel_peak
    falls) and leaves every token norm as it is (token_norm unchanged): the statistic tells rotated
    from unrotated sites, the token norm does not."""
    from rsq.rotation.hadamard import hadamard_matrix

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 64, generator=g)
    x[0, 0, 5] = 400.0
    H = hadamard_matrix(64).float() / 8
    raw, rot = InputStats(), InputStats()
    raw.add(x)
    rot.add(x @ H.T)
    a, b = raw.summary(), rot.summary()
    assert a["channel_peak"] > 50 > 10 > b["channel_peak"]
    assert a["token_norm"] == pytest.approx(b["token_norm"], rel=1e-4)


def test_empty_and_bad_config():
    with pytest.raises(RuntimeError):
        InputStats().summary()
    with pytest.raises(ConfigError, match="unrotated-outliers"):
        ImportanceConfig(unrotated_outliers="keep-8bit")
    with pytest.raises(ConfigError, match="outlier-ratio"):
        ImportanceConfig(outlier_ratio=1.0)
    with pytest.raises(ConfigError, match="outlier-ratio"):
        ImportanceConfig(outlier_ratio=float("nan"))
