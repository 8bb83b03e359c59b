"""Small statistics: medians and percentiles of samples, as quoted in the report."""

from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence


def median(xs: Iterable[float]) -> Optional[float]:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def percentile(xs: Iterable[float], p: float) -> Optional[float]:
    """Nearest-rank percentile (p in 0..100): a value that was measured, never
    an interpolation; p99 of fewer than 100 samples is the maximum."""
    xs = sorted(xs)
    if not xs:
        return None
    rank = max(1, math.ceil(p / 100 * len(xs)))
    return xs[rank - 1]


def summary(xs: Sequence[float]) -> dict:
    """n, p50, p90, p99, min, max of samples (same unit as the samples)."""
    return {
        "n": len(xs),
        "p50": median(xs),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
    }


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def fmt(x: Optional[float], digits: int = 1, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}{unit}"
