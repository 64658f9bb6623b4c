"""Surviving accelerator out-of-memory errors without losing the replica or the batch.

A UNet call's memory grows with its rows × latent area. The engine's configured caps are a guess
made for a typical GPU; fragmentation, a neighbour process or an unusual mix of sizes can still
push one call over. Instead of failing every request in the batch (or crashing the replica), the
engine splits the call in halves and retries, and remembers, per latent-size bucket and for a
cool-down period, the largest number of samples that ran: later calls of that bucket are cut to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

#: How long a lowered cap holds before the configured cap is tried again.
DEFAULT_COOLDOWN_S = 60.0


def is_out_of_memory(error: BaseException) -> bool:
    """True for an allocator failure on any device (CUDA raises ``torch.OutOfMemoryError``)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    """Give the caching allocator's free blocks back after an OOM, so the halves can fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BucketCaps:
    """Per-bucket sample caps lowered by out-of-memory errors, each until its cool-down ends."""

    cooldown_s: float = DEFAULT_COOLDOWN_S
    clock: object = time.monotonic
    _lowered: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)

    def lower(self, bucket: tuple[int, int], failed_samples: int) -> int:
        """A call of ``failed_samples`` ran out of memory and is retried in halves: cap the bucket at
        the larger half (at least 1); if that half fails too, it lowers the cap again."""
        cap = max(1, (failed_samples + 1) // 2)
        current = self.cap(bucket)
        if current is not None:
            cap = min(cap, current)
        self._lowered[bucket] = (cap, self.clock() + self.cooldown_s)
        return cap

    def cap(self, bucket: tuple[int, int]) -> int | None:
        """The lowered cap of ``bucket``, or None when it is not (or no longer) lowered."""
        entry = self._lowered.get(bucket)
        if entry is None:
            return None
        cap, until = entry
        if self.clock() >= until:
            del self._lowered[bucket]
            return None
        return cap

    def snapshot(self) -> dict[tuple[int, int], int]:
        """Every bucket whose cap is lowered now (for the effective-cap metric)."""
        return {bucket: cap for bucket in list(self._lowered) if (cap := self.cap(bucket)) is not None}
