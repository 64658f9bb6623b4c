"""The batching engine's knobs, torch-free so the serving layer can validate them at start-up."""

from __future__ import annotations

from dataclasses import dataclass

ADMISSION_POLICIES = ("fifo", "fair")


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs; the serving layer changes them live (Ray Serve ``user_config``).

    ``max_batch_samples`` caps the samples sharing one UNet call. ``max_batch_row_area`` caps
    rows × latent height × latent width per call, the quantity that really drives memory and time
    (a pix2pix sample costs 3 rows, a guidance-free one 1 row, a 1024² one 16× a 256² one).
    ``admission`` is ``fifo`` (arrival order) or ``fair`` (the tenant that has received the least
    denoising work goes first). ``exact`` runs the batch-variant GEMMs per sample (bitwise equal to the stock
    pipeline on CPU; a few percent slower). ``vectorise`` steps DDIM/Euler samples in one tensor op.
    """

    max_batch_samples: int = 8
    max_batch_row_area: int | None = None
    admission: str = "fifo"
    exact: bool = False
    vectorise: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_samples <= 256:
            raise ValueError(f"max_batch_samples = {self.max_batch_samples} must be in 1..256")
        if self.max_batch_row_area is not None and self.max_batch_row_area < 1:
            raise ValueError(f"max_batch_row_area = {self.max_batch_row_area} must be positive or None")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission = {self.admission!r}; choose one of {ADMISSION_POLICIES}")
