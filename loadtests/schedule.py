"""The soak's open-loop schedule: when each request is due, fixed before the run and bounded twice.

Open loop means the arrival times do not depend on the answers: a slow service does not slow the
client down (as a closed loop of N users would), it makes the client fall behind the schedule, which
the soak then reports. Both bounds hold by construction: no arrival at or after ``duration_s`` and
never more than ``max_requests`` of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from loadtests._shared import percentile

PROCESSES = ("poisson", "fixed")


def arrivals(
    rate: float, duration_s: float, max_requests: int, process: str = "poisson", seed: int = 0
) -> list[float]:
    """Offsets in seconds from the start: Poisson (exponential gaps, mean ``1/rate``) or every ``1/rate``."""
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    if rate <= 0 or duration_s <= 0 or max_requests <= 0:
        return []
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0 if process == "fixed" else rng.expovariate(rate)
    for index in range(1, max_requests + 1):
        if t >= duration_s:
            break
        times.append(t)
        t = index / rate if process == "fixed" else t + rng.expovariate(rate)
    return times


@dataclass(frozen=True)
class ScheduleHealth:
    """How well the client kept to the schedule: lag = actual send time - due time (waiting for a free
    concurrency slot is what makes it grow); unsent = requests skipped because no slot came free within
    ``max_lag_s`` of their due time."""

    scheduled: int
    sent: int
    lag_p50_s: float | None
    lag_p95_s: float | None
    lag_max_s: float | None
    max_lag_s: float

    @property
    def unsent(self) -> int:
        return self.scheduled - self.sent

    @property
    def behind(self) -> bool:
        """Badly behind: at least one request could not be sent within ``max_lag_s`` of its due time."""
        return self.unsent > 0


def schedule_health(scheduled: int, lags_s: list[float], max_lag_s: float) -> ScheduleHealth:
    return ScheduleHealth(
        scheduled=scheduled,
        sent=len(lags_s),
        lag_p50_s=percentile(lags_s, 50),
        lag_p95_s=percentile(lags_s, 95),
        lag_max_s=max(lags_s, default=None),
        max_lag_s=max_lag_s,
    )
