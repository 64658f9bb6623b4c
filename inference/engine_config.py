"""The batching engine's knobs, torch-free so the serving layer can validate them at start-up."""

from __future__ import annotations

from dataclasses import dataclass

ADMISSION_POLICIES = ("fifo", "fair")
#: How previews are made (``inference.previews``, which imports torch; this module must not).
PREVIEW_METHODS = ("latent_rgb", "vae")


@dataclass(frozen=True)
class EngineConfig:
    """Batching knobs; the serving layer changes them live (Ray Serve ``user_config``).

    ``max_batch_samples`` caps the samples sharing one UNet call. ``max_batch_row_area`` caps
    rows × latent height × latent width per call, the quantity that really drives memory and time
    (a pix2pix sample costs 3 rows, a guidance-free one 1 row, a 1024² one 16× a 256² one).
    ``admission`` is ``fifo`` (arrival order) or ``fair`` (the tenant that has received the least
    denoising work goes first). ``exact`` runs the batch-variant GEMMs per sample (bitwise equal to the stock
    pipeline on CPU; a few percent slower). ``vectorise`` steps DDIM/Euler samples in one tensor op.
    Previews (for requests that ask, ``inference.previews``): ``preview_method`` ``latent_rgb`` (a
    fitted linear projection, nearly free) or ``vae`` (a real decode, about a step's cost each);
    ``preview_max_side`` bounds their size and ``preview_min_steps`` how often one image gets one.
    """

    max_batch_samples: int = 8
    max_batch_row_area: int | None = None
    admission: str = "fifo"
    exact: bool = False
    vectorise: bool = True
    preview_method: str = "latent_rgb"
    preview_max_side: int = 256
    preview_min_steps: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_samples <= 256:
            raise ValueError(f"max_batch_samples = {self.max_batch_samples} must be in 1..256")
        if self.max_batch_row_area is not None and self.max_batch_row_area < 1:
            raise ValueError(f"max_batch_row_area = {self.max_batch_row_area} must be positive or None")
        if self.admission not in ADMISSION_POLICIES:
            raise ValueError(f"admission = {self.admission!r}; choose one of {ADMISSION_POLICIES}")
        if self.preview_method not in PREVIEW_METHODS:
            raise ValueError(f"preview_method = {self.preview_method!r}; choose one of {PREVIEW_METHODS}")
        if not 16 <= self.preview_max_side <= 1024:
            raise ValueError(f"preview_max_side = {self.preview_max_side} must be in 16..1024 pixels")
        if self.preview_min_steps < 1:
            raise ValueError(f"preview_min_steps = {self.preview_min_steps} must be at least 1")


COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")


@dataclass(frozen=True)
class OptimizeConfig:
    """Load-time speed-ups of one model replica (not live: changing them means new replicas).

    ``channels_last`` stores the UNet and VAE weights NHWC (tensor-core convolutions on GPUs).
    ``compile`` is ``off`` or a ``torch.compile`` mode for the UNet: ``default``, ``max-autotune``
    or ``reduce-overhead`` (CUDA graphs). A compiled UNet specialises on every input shape, so
    ``row_buckets`` bounds the shapes: each UNet call's rows are padded up to the next bucket (the
    padding rows' outputs are dropped) and a call never takes more rows than the largest bucket.
    ``warmup_sizes`` lists the (height, width) image sizes whose every bucket the replica runs once
    before it reports ready, so no request pays a compile.
    """

    channels_last: bool = False
    compile: str = "off"
    row_buckets: tuple[int, ...] | None = None
    warmup_sizes: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"optimize.compile = {self.compile!r}; choose one of {COMPILE_MODES}")
        if self.row_buckets is not None:
            buckets = tuple(int(b) for b in self.row_buckets)
            if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise ValueError(
                    f"optimize.row_buckets = {list(self.row_buckets)} must be strictly increasing "
                    "positive row counts, e.g. [2, 4, 8, 16]"
                )
            object.__setattr__(self, "row_buckets", buckets)
        if self.compile != "off" and self.row_buckets is None:
            raise ValueError(
                f"optimize.compile = {self.compile!r} specialises the UNet on every batch size it sees; "
                "set optimize.row_buckets (e.g. [2, 4, 8, 16]) so calls are padded to a few shapes "
                "that warm-up compiles before traffic"
            )
        sizes = tuple((int(h), int(w)) for h, w in self.warmup_sizes)
        for height, width in sizes:
            if height < 8 or width < 8 or height % 8 or width % 8:
                raise ValueError(
                    f"optimize.warmup_sizes entry [{height}, {width}] must be [height, width] in "
                    "pixels, multiples of 8"
                )
        if sizes and self.row_buckets is None:
            raise ValueError("optimize.warmup_sizes needs optimize.row_buckets: warm-up runs each bucket")
        object.__setattr__(self, "warmup_sizes", sizes)

    @property
    def max_rows(self) -> int | None:
        """The most UNet rows one call may take (the largest bucket), or None when unbounded."""
        return self.row_buckets[-1] if self.row_buckets else None

    def padded_rows(self, rows: int) -> int:
        """``rows`` rounded up to the next bucket (unchanged without buckets or beyond the last)."""
        for bucket in self.row_buckets or ():
            if bucket >= rows:
                return bucket
        return rows

    @property
    def warmup_shapes(self) -> int:
        return len(self.warmup_sizes) * len(self.row_buckets or ())
