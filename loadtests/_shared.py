"""Parts several loadtests modules share (the runner, the locustfile, the soak); plain Python (no locust,
no gevent)."""

from __future__ import annotations

import math

MAX_DURATION_S = 900


def parse_api_keys(spec: str) -> list[tuple[str, str, float]]:
    """``"a=k1:3,k2"`` → ``[("a", "k1", 3.0), ("tenant2", "k2", 1.0)]``."""
    tenants = []
    for raw in (part.strip() for part in spec.split(",")):
        if not raw:
            continue
        name, sep, key = raw.partition("=")
        if not (sep and key.strip("=") and name.replace("-", "").replace("_", "").isalnum()):
            name, key = "", raw  # no tenant name (keys may contain "=")
        weight = 1.0
        head, sep, tail = key.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                key = head
            except ValueError:
                pass
        tenants.append((name or f"tenant{len(tenants) + 1}", key, max(weight, 0.0)))
    return tenants


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's default);
    ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_steps(spec: str) -> tuple[int, int]:
    low, _, high = spec.partition("-")
    lo = max(1, int(low))
    return lo, max(lo, int(high or low))


# Load shapes: plain functions of elapsed time → (users, spawn rate) or None (stop), all bounded.


def constant_shape(elapsed: float, users: int, duration: float) -> tuple[int, float] | None:
    return None if elapsed >= duration else (users, float(users))


def step_shape(elapsed: float, users: int, duration: float, steps: int = 4) -> tuple[int, float] | None:
    """Ramps to ``users`` in ``steps`` equal steps, each held for ``duration / steps``."""
    if elapsed >= duration:
        return None
    steps = max(1, min(steps, users))
    level = min(int(elapsed // (duration / steps)) + 1, steps)
    return max(1, math.ceil(users * level / steps)), float(users)


def spike_shape(elapsed: float, users: int, duration: float) -> tuple[int, float] | None:
    """A quarter of ``users`` (at least 1), the full ``users`` in the middle fifth, then back."""
    if elapsed >= duration:
        return None
    baseline = max(1, users // 4)
    if 0.4 * duration <= elapsed < 0.6 * duration:
        return users, float(users)
    return baseline, float(users)


SHAPES = {"constant": constant_shape, "step": step_shape, "spike": spike_shape}


#: Prompts the load generators draw from (locust users and the soak client alike).
PROMPTS = (
    "a lighthouse at dusk, oil painting",
    "a red bicycle leaning on a brick wall",
    "a snowy mountain village, watercolor",
    "a bowl of fruit, still life",
    "a city street at night in the rain",
)
