"""The automatic high-norm threshold: finds planted outlier modes of any width and rarity, ~nothing in clean data."""

import numpy as np
import pytest

from vitreg.analysis.threshold import auto_threshold


def lognormal(rng, n, mean, std):
    return np.exp(rng.normal(mean, std, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "spread, share, factor",
    [
        (0.4, 0.024, 10.0),  # DINOv2 ViT-g-like: ~2.4% of tokens, ~10x the norm, wide modes
        (0.1, 0.02, 3.0),  # narrow modes, only 3x
        (0.3, 0.003, 10.0),  # rare: 15 tokens in 5000, too few for a histogram split such as Otsu's
    ],
)
def test_finds_planted_outlier_mode(seed, spread, share, factor):
    rng = np.random.default_rng(seed)
    norms = lognormal(rng, 5000, 3.0, spread)
    planted = rng.choice(5000, size=int(5000 * share), replace=False)
    norms[planted] = lognormal(rng, planted.size, 3.0 + np.log(factor), spread)
    found = norms > auto_threshold(norms)
    truth = np.zeros(5000, dtype=bool)
    truth[planted] = True
    precision = (found & truth).sum() / max(found.sum(), 1)
    recall = (found & truth).sum() / truth.sum()
    assert precision >= 0.95 and recall >= 0.9, (precision, recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "draw",
    [
        lambda rng: lognormal(rng, 5000, 3.0, 0.3),
        lambda rng: lognormal(rng, 5000, 1.0, 0.05),
        lambda rng: np.exp(2.0 + 0.2 * rng.laplace(size=5000)),  # heavy-tailed, still one mode
        lambda rng: np.exp(rng.gamma(2.0, 0.2, 5000)),  # skewed, one mode
    ],
)
def test_clean_distributions_have_almost_no_outliers(seed, draw):
    norms = draw(np.random.default_rng(seed))
    assert (norms > auto_threshold(norms)).mean() <= 0.002


def test_scale_free_and_at_least_twice_the_median():
    rng = np.random.default_rng(0)
    norms = lognormal(rng, 3000, 2.0, 0.3)
    norms[:60] *= 10
    assert auto_threshold(norms * 100) == pytest.approx(100 * auto_threshold(norms), rel=1e-6)
    constant = np.full(500, 7.0)  # a freshly initialised model: every token has the same norm
    assert auto_threshold(constant) == pytest.approx(14.0)
    assert not (constant > auto_threshold(constant)).any()
