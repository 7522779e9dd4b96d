"""Statistics of the benchmark protocol: medians with min..max and paired per-round ratios.

Paired ratios survive a noisy shared machine: in each round the two systems ran the same
workload back to back, so their ratio cancels most of the load that round had; the median of
the per-round ratios then discards the outlier rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median and spread of one system's samples on one row."""

    median: float
    minimum: float
    maximum: float
    count: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.minimum, "max": self.maximum, "n": self.count}


def summarize(samples: Sequence[float | None]) -> Summary | None:
    """Median, min and max of the samples that exist (``None`` = failed sample); None if none."""
    values = [value for value in samples if value is not None]
    if not values:
        return None
    return Summary(statistics.median(values), min(values), max(values), len(values))


def paired_ratios(ours: Sequence[float | None], theirs: Sequence[float | None]) -> list[float]:
    """Per-round ratios ours[i] / theirs[i] for the rounds where both exist and theirs > 0."""
    ratios = []
    for mine, other in zip(ours, theirs, strict=False):
        if mine is None or other is None or other <= 0:
            continue
        ratios.append(mine / other)
    return ratios


def paired_ratio(ours: Sequence[float | None], theirs: Sequence[float | None]) -> float | None:
    """Median of the per-round paired ratios, or None when no round has both samples."""
    ratios = paired_ratios(ours, theirs)
    if not ratios:
        return None
    return statistics.median(ratios)


def rotate(items: Sequence[str], round_index: int) -> list[str]:
    """The systems' order in one round: rotated by the round number so none always runs first."""
    if not items:
        return []
    shift = round_index % len(items)
    return list(items[shift:]) + list(items[:shift])
