"""Uncertainty of accuracies measured on a finite set of images, and paired comparisons of two runs.

Every accuracy fedrobust reports is a proportion of ``n`` images, so its
95% interval is the Wilson score interval of ``k`` successes in ``n``
(scipy's :meth:`~scipy.stats.binomtest`'s ``proportion_ci``): it stays
inside [0, 1] and is honest at 0 and 1 robust images, where the normal
approximation collapses.

Two runs evaluated on the same images are compared image by image
(:func:`paired`): with ``b`` the images only run A got right and ``c`` the
images only run B got right, McNemar's exact test is the two-sided binomial
test of ``b`` in ``b + c`` at 1/2 (scipy), and the difference of accuracies
``(b - c) / n`` gets the interval that goes with that test: the exact
(Clopper-Pearson) interval of ``b / (b + c)``, mapped to ``(b + c) / n *
(2 p - 1)``. It is conditional on the number of discordant images, as the
exact test is, so the interval excludes 0 exactly when the test rejects at
5% (up to the two-sided exact test's discreteness).

Only scipy does statistics here; this module does the bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

__all__ = ["Paired", "interval", "interval_of", "paired"]

LEVEL = 0.95


def interval(k: int, n: int, level: float = LEVEL) -> list[float] | None:
    """The Wilson score interval of ``k`` successes in ``n`` trials, as ``[low, high]``; None if ``n`` is 0."""
    k, n = int(k), int(n)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"successes must be in [0, {n}], got {k}")
    ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def interval_of(accuracy: float | None, n: int | None, level: float = LEVEL) -> list[float] | None:
    """The Wilson interval of an accuracy measured on ``n`` images (its count of correct images recovered)."""
    if accuracy is None or not n:
        return None
    return interval(round(float(accuracy) * int(n)), int(n), level)


@dataclass(frozen=True)
class Paired:
    """Two runs' accuracies on the same ``n`` images, their difference ``a - b`` and the exact test."""

    n: int
    a: float
    b: float
    only_a: int  # images run A got right and run B did not
    only_b: int
    difference: float  # a - b
    interval: list[float]  # 95% interval of the difference
    p_value: float  # McNemar's exact test, two-sided


def paired(correct_a: np.ndarray, correct_b: np.ndarray, level: float = LEVEL) -> Paired:
    """Compare two per-image correctness vectors of the same images (see the module docstring)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired: both runs need one value per image of the same images, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        raise ValueError("paired: no images")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = only_a + only_b
    if discordant == 0:
        p_value, ci = 1.0, [0.0, 0.0]
    else:
        test = binomtest(only_a, discordant, 0.5)
        p_value = float(test.pvalue)
        low, high = test.proportion_ci(confidence_level=level, method="exact")
        scale = discordant / n
        ci = [scale * (2 * float(low) - 1), scale * (2 * float(high) - 1)]
    return Paired(n=n, a=float(a.mean()), b=float(b.mean()), only_a=only_a, only_b=only_b,
                  difference=(only_a - only_b) / n, interval=ci, p_value=p_value)
