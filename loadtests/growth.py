"""Memory growth per process from its samples: totals, and a least-squares slope over the steady part.

Why a slope over the second half: the first minutes of a run grow for good reasons (imports, model and
allocator warm-up, caches, connection pools); a leak is what keeps growing afterwards. A least-squares
fit over every sample of the window is much less sensitive to one noisy reading than last - first.
A process is flagged when the slope exceeds the threshold AND the fitted rise across the window is at
least ``min_rise_mb``: on a short run a few MB of allocator noise extrapolate to a huge rate per hour.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from loadtests.workers import MemorySample

MIN_WINDOW_POINTS = 3


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope dy/dt; ``None`` with fewer than two distinct times."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return None
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var_t


def steady_window(start_t: float, end_t: float, warmup_fraction: float = 0.5) -> tuple[float, float]:
    """The part of ``[start_t, end_t]`` after the warm-up fraction."""
    return start_t + (end_t - start_t) * warmup_fraction, end_t


@dataclass(frozen=True)
class Growth:
    key: str
    label: str
    pid: int
    samples: int
    first_t: float
    last_t: float
    first_mb: float
    last_mb: float
    max_mb: float
    last_uss_mb: float | None
    window_points: int
    slope_mb_per_h: float | None  # over the steady window; None with too few points there
    flagged: bool

    @property
    def growth_mb(self) -> float:
        return self.last_mb - self.first_mb


def process_growth(
    samples: list[MemorySample],
    window: tuple[float, float],
    threshold_mb_per_h: float,
    min_rise_mb: float = 5.0,
) -> Growth:
    """Figures for one process's samples (any order); ``window`` from ``steady_window``."""
    ordered = sorted(samples, key=lambda s: s.t)
    first, last = ordered[0], ordered[-1]
    in_window = [(s.t, s.rss_mb) for s in ordered if window[0] <= s.t <= window[1]]
    per_s = slope(in_window) if len(in_window) >= MIN_WINDOW_POINTS else None
    per_h = None if per_s is None else per_s * 3600
    rise = 0.0 if per_s is None else per_s * (in_window[-1][0] - in_window[0][0])
    return Growth(
        key=first.key,
        label=first.label,
        pid=first.pid,
        samples=len(ordered),
        first_t=first.t,
        last_t=last.t,
        first_mb=first.rss_mb,
        last_mb=last.rss_mb,
        max_mb=max(s.rss_mb for s in ordered),
        last_uss_mb=last.uss_mb,
        window_points=len(in_window),
        slope_mb_per_h=per_h,
        flagged=per_h is not None and per_h > threshold_mb_per_h and rise >= min_rise_mb,
    )


def all_growth(
    samples: list[MemorySample],
    start_t: float,
    end_t: float,
    *,
    threshold_mb_per_h: float,
    warmup_fraction: float = 0.5,
    min_rise_mb: float = 5.0,
) -> list[Growth]:
    """One ``Growth`` per process, largest last RSS first."""
    by_key: dict[str, list[MemorySample]] = defaultdict(list)
    for sample in samples:
        by_key[sample.key].append(sample)
    window = steady_window(start_t, end_t, warmup_fraction)
    rows = [process_growth(s, window, threshold_mb_per_h, min_rise_mb) for s in by_key.values()]
    return sorted(rows, key=lambda g: -g.last_mb)
