"""An automatic high-norm threshold that works across models, since the paper's cutoff (150) fits only DINOv2 ViT-g."""

import math

import numpy as np

from vitreg.core.errors import UserError

MIN_RATIO = 2.0  # an outlier is at least twice the median norm (the paper's outliers are ~10x)
ROBUST_SIGMAS = 6.0  # without a second mode: this many robust standard deviations of log norm above the median
MIN_SEPARATION = 3.0  # the two modes' means lie this many (combined) standard deviations apart
MAX_OUTLIER_SHARE = 0.25  # artifacts are a minority (2.37% in DINOv2 ViT-g); a larger upper mode is no artifact
MIN_MODE_TOKENS = 3  # a "mode" of one or two extreme tokens is a tail, not a mode
EM_STEPS = 200
EM_SAMPLES = 20000  # EM runs on evenly spaced quantiles of larger pools: same shape, bounded time


def _normal_density(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


def two_modes(logs: np.ndarray, median: float, sigma: float) -> tuple[float, float, float, float, float] | None:
    """EM fit of a bulk plus a high mode to log norms: `(weight_high, mean_low, std_low, mean_high, std_high)`.

    Starts from the robust bulk (median, sigma) and the tokens above median + 3 sigma; None when there are none.
    """
    high = logs > median + 3 * sigma
    if high.sum() == 0 or high.all():
        return None
    floor = 1e-3 + 0.1 * sigma  # keeps a mode from collapsing onto a few identical values
    weight, means = high.mean(), [median, logs[high].mean()]
    stds = [max(sigma, floor), max(logs[high].std(), floor)]
    for _ in range(EM_STEPS):
        low_density = (1 - weight) * _normal_density(logs, means[0], stds[0])
        high_density = weight * _normal_density(logs, means[1], stds[1])
        responsibility = high_density / np.maximum(low_density + high_density, 1e-300)  # P(high | x)
        mass = responsibility.sum()
        if mass < 1e-9 or mass > logs.size - 1e-9:
            return None
        weight = mass / logs.size
        for index, r in enumerate((1 - responsibility, responsibility)):
            means[index] = float((r * logs).sum() / r.sum())
            stds[index] = max(math.sqrt(float((r * (logs - means[index]) ** 2).sum() / r.sum())), floor)
    return float(weight), means[0], stds[0], means[1], stds[1]


def auto_threshold(norms: np.ndarray) -> float:
    """A norm above which tokens are high-norm outliers, or a value above all of them when there are none.

    The rule works on log norms, so it does not depend on a model's scale:
    1. Fit two Gaussians (bulk + high mode) by EM, starting from the robust bulk. When the high mode is a real,
       separate minority (<= 25% of tokens, means >= 3 combined standard deviations apart: clearly bimodal, as in
       the paper's Figure 3), cut where a token becomes more likely to belong to the high mode. This holds however
       wide the modes are and however few outliers there are; a histogram split such as Otsu's misses rare outliers.
    2. Otherwise (a unimodal, possibly heavy-tailed distribution) use the robust outlier rule median + 6 robust
       standard deviations (1.4826 * MAD), exceeded by ~1e-9 of a Gaussian, so a clean model reports ~0 outliers.
    Either cut is at least twice the median norm: tokens of near-constant norm (MAD ~ 0) are never outliers.
    """
    norms = np.asarray(norms, dtype=np.float64).ravel()
    logs = np.log(norms[norms > 0])
    if logs.size == 0:
        return 0.0
    median = float(np.median(logs))
    sigma = 1.4826 * float(np.median(np.abs(logs - median)))
    cut = median + ROBUST_SIGMAS * sigma
    sample = np.sort(logs)[:: max(1, logs.size // EM_SAMPLES)]
    modes = two_modes(sample, median, sigma) if logs.size >= 8 else None
    if modes is not None:
        weight, mean_low, std_low, mean_high, std_high = modes
        separated = mean_high - mean_low >= MIN_SEPARATION * math.hypot(std_low, std_high)
        if separated and MIN_MODE_TOKENS <= weight * logs.size and weight <= MAX_OUTLIER_SHARE:
            grid = np.linspace(mean_low, mean_high, 2001)
            high = weight * _normal_density(grid, mean_high, std_high)
            high_wins = high > (1 - weight) * _normal_density(grid, mean_low, std_low)
            if high_wins.any():
                cut = float(grid[np.argmax(high_wins)])  # the first point between the means where the high mode wins
    return float(math.exp(max(cut, median + math.log(MIN_RATIO))))


def check_threshold(threshold: float | None) -> None:
    """Refuse a fixed outlier threshold (`--threshold`) that is not a positive norm."""
    if threshold is not None and not threshold > 0:  # `not >`: NaN is refused too
        raise UserError(f"--threshold must be a positive norm, got {threshold}")
