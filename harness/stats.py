"""The statistics every command reports, defined once: a p90 from `flashbench generate`, a record and `flashbench
validate` is the same number for the same samples."""

from __future__ import annotations

import statistics

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("a percentile of no values")
    return float(np.percentile(values, q))


def spread(values: list[float]) -> dict:
    """{"mean", "p50", "p90"} of per-token times; {} for none."""
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p90": percentile(values, 90)}
