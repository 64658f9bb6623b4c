"""Step-level (continuous) batching: many img2img requests share every UNet forward pass.

A stock diffusers call takes one strength, step count, guidance and size, so request-level batching
only groups identical parameters, which under live traffic almost never happens. This engine owns
the denoising loop instead. Every *sample* (one output image) carries its own timestep, scheduler
state, generator and guidance; each ``step()`` admits waiting samples, runs ONE UNet call over the
rows of every active sample of one latent-size bucket, applies each sample's guidance and scheduler
step, and decodes the samples that finished, so requests join and leave between steps.

The engine is plain synchronous Python: the serving layer calls ``submit`` and ``cancel`` from any
thread (they only post to an inbox) and drives ``step`` from one dedicated thread.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from inference.engine_config import EngineConfig
from inference.errors import GenerationError, InferenceError, InvalidInputError, RequestCancelledError
from inference.exact import install_row_chunking, row_groups
from inference.families import ADAPTERS, Conditioning, strength_timesteps
from inference.models import Family
from inference.schedulers import vectorised_step
from inference.types import GenerationRequest, GenerationResult, Progress


@dataclass(frozen=True)
class StepStats:
    """What one ``step()`` did, for metrics: the real batch size and where the time went."""

    bucket: tuple[int, int]
    samples: int
    rows: int
    admitted: int
    finished: int
    unet_s: float
    step_s: float


@dataclass(frozen=True)
class Outcome:
    """A request left the engine: with its images, or with the error that ended it."""

    request_id: str
    result: GenerationResult | None = None
    error: InferenceError | None = None


@dataclass(eq=False)
class _RequestState:
    request: GenerationRequest
    submitted_at: float
    order: int
    waiting: deque[int]
    images: list = field(default_factory=list)
    conditioning: Conditioning | None = None
    admitted_at: float | None = None
    steps_done: int = 0
    steps_total: int = 0
    active_samples: int = 0
    compute_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    failed: InferenceError | None = None

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.request.height, self.request.width)


@dataclass(eq=False)
class _Sample:
    state: _RequestState
    index: int
    generator: torch.Generator
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor
    position: int = 0

    @property
    def rows(self) -> int:
        return self.state.conditioning.rows

    @property
    def done(self) -> bool:
        return self.position >= len(self.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.position]


class StepBatchingEngine:
    """Continuous batching over one loaded diffusers pipeline (one model per engine)."""

    def __init__(
        self, pipe, family: Family | str, config: EngineConfig | None = None, *, output_type: str = "pil"
    ) -> None:
        """``output_type="np"`` returns float arrays in [0, 1] instead of PIL images: tests compare
        those against the stock pipeline bit for bit, before 8-bit quantisation hides differences."""
        self._pipe = pipe
        self._output_type = output_type
        self._family = Family(family)
        self._adapter = ADAPTERS[self._family]
        self.config = config or EngineConfig()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[_RequestState] = []
        self._requests: dict[str, _RequestState] = {}
        self._active: dict[tuple[int, int], list[_Sample]] = {}
        self._served_at: dict[tuple[int, int], int] = {}
        self._served: dict[str, float] = {}
        self._schedule_cache: dict[int, object] = {}
        self._order = itertools.count()
        self._iteration = 0
        self._vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        step_params = inspect.signature(pipe.scheduler.step).parameters
        self._step_takes_eta = "eta" in step_params
        self._step_takes_generator = "generator" in step_params
        install_row_chunking(pipe.unet)

    # ---- called from any thread ------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it is admitted between steps. Shape errors are raised here, at once."""
        if request.width % self._vae_scale or request.height % self._vae_scale:
            raise InvalidInputError(
                f"image size {request.width}x{request.height} must be a multiple of {self._vae_scale}",
                param="width",
                value=request.width,
            )
        if request.num_images < 1 or request.steps < 1:
            raise InvalidInputError("num_images and steps must be at least 1", param="num_images")
        self._inbox.put(("submit", request, time.monotonic()))

    def cancel(self, request_id: str) -> None:
        """Ask for a request to leave at the next step; its other-request neighbours are unaffected."""
        self._inbox.put(("cancel", request_id, None))

    def reconfigure(self, config: EngineConfig) -> None:
        """New knobs take effect at the next admission; samples already running are not disturbed."""
        self.config = config

    def progress(self, request_id: str) -> Progress | None:
        state = self._requests.get(request_id)
        if state is None:
            return None
        return Progress(state.steps_done, state.steps_total)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._active or not self._inbox.empty())

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    @property
    def active_samples(self) -> int:
        return sum(len(samples) for samples in self._active.values())

    # ---- called from the engine thread -----------------------------------------------------------

    def step(self) -> tuple[list[Outcome], StepStats | None]:
        """One iteration: take the inbox, admit, run one UNet step for one bucket, finish samples."""
        started = time.perf_counter()
        outcomes: list[Outcome] = []
        self._drain_inbox(outcomes)
        admitted = self._admit(outcomes)
        bucket = self._next_bucket()
        if bucket is None:
            return outcomes, None
        samples = self._active[bucket]
        unet_started = time.perf_counter()
        with torch.inference_mode():
            self._denoise(samples, outcomes)
            unet_s = time.perf_counter() - unet_started
            self._attribute(samples, unet_s)
            finished = [s for s in samples if s.done]
            if finished:
                self._finish(bucket, finished, outcomes)
        self._iteration += 1
        self._served_at[bucket] = self._iteration
        stats = StepStats(
            bucket=bucket,
            samples=len(samples),
            rows=sum(s.rows for s in samples),
            admitted=admitted,
            finished=len(finished),
            unet_s=unet_s,
            step_s=time.perf_counter() - started,
        )
        return outcomes, stats

    @staticmethod
    def _attribute(samples: list[_Sample], seconds: float) -> None:
        """Split one UNet call's time among its samples by rows: what each request cost (metering)."""
        rows = sum(s.rows for s in samples) or 1
        for sample in samples:
            sample.state.compute_s += seconds * sample.rows / rows

    def run_until_idle(self) -> list[Outcome]:
        """Step until nothing is queued or running (tests, benchmarks, the local demo)."""
        outcomes: list[Outcome] = []
        while self.has_work:
            outcomes.extend(self.step()[0])
        return outcomes

    # ---- inbox and admission ---------------------------------------------------------------------

    def _drain_inbox(self, outcomes: list[Outcome]) -> None:
        while True:
            try:
                kind, payload, at = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self._accept(payload, at, outcomes)
            else:
                self._cancel_now(payload, outcomes)

    def _accept(self, request: GenerationRequest, at: float, outcomes: list[Outcome]) -> None:
        if request.request_id in self._requests:
            error = InvalidInputError(
                f"request id {request.request_id!r} is already in flight", param="request_id"
            )
            outcomes.append(Outcome(request.request_id, error=error))
            return
        state = _RequestState(request, at, next(self._order), deque(range(request.num_images)))
        state.images = [None] * request.num_images
        self._start_account(request.tenant)
        self._requests[request.request_id] = state
        self._pending.append(state)

    def _cancel_now(self, request_id: str, outcomes: list[Outcome]) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        self._drop(state)
        outcomes.append(
            Outcome(request_id, error=RequestCancelledError(f"request {request_id} was canceled"))
        )

    def _drop(self, state: _RequestState) -> None:
        """Remove every trace of a request: queued entry, running samples, progress record."""
        self._requests.pop(state.request.request_id, None)
        if state in self._pending:
            self._pending.remove(state)
        samples = self._active.get(state.bucket)
        if samples:
            samples[:] = [s for s in samples if s.state is not state]
            if not samples:
                del self._active[state.bucket]

    def _next_candidate(self, blocked: set[tuple[int, int]]) -> _RequestState | None:
        """The request whose next sample is admitted next.

        ``fifo``: the oldest waiting request. ``fair``: the oldest waiting request of the tenant that
        has received the least denoising work (rows × latent area × steps), so a tenant with a deep
        backlog cannot starve one that just arrived. A request never overtakes an older one of the
        same bucket that did not fit (``blocked``), which keeps order within a bucket.
        """
        candidates = [state for state in self._pending if state.bucket not in blocked]
        if not candidates:
            return None
        if self.config.admission == "fifo":
            return candidates[0]
        return min(candidates, key=lambda st: (self._served.get(st.request.tenant, 0.0), st.order))

    def _charge(self, sample: _Sample) -> None:
        area = (sample.state.bucket[0] // self._vae_scale) * (sample.state.bucket[1] // self._vae_scale)
        tenant = sample.state.request.tenant
        self._served[tenant] = self._served.get(tenant, 0.0) + sample.rows * area * len(sample.timesteps)

    def _start_account(self, tenant: str) -> None:
        """A tenant that (re)appears starts level with the least-served busy tenant: idling is no credit."""
        busy = {st.request.tenant for st in self._requests.values()} - {tenant}
        floor = min((self._served.get(t, 0.0) for t in busy), default=0.0)
        self._served[tenant] = max(self._served.get(tenant, 0.0), floor)

    def _fits(self, bucket: tuple[int, int], rows: int) -> bool:
        samples = self._active.get(bucket, [])
        if len(samples) >= self.config.max_batch_samples:
            return False
        if self.config.max_batch_row_area is None:
            return True
        area = (bucket[0] // self._vae_scale) * (bucket[1] // self._vae_scale)
        used = sum(s.rows for s in samples) * area
        # A lone sample is always admitted, or an oversized request would wait forever.
        return not samples or used + rows * area <= self.config.max_batch_row_area

    def _admit(self, outcomes: list[Outcome]) -> int:
        admitted = 0
        blocked: set[tuple[int, int]] = set()
        while (state := self._next_candidate(blocked)) is not None:
            try:
                with torch.inference_mode():
                    if state.conditioning is None:
                        self._condition(state)
                    if not self._fits(state.bucket, state.conditioning.rows):
                        blocked.add(state.bucket)
                        continue
                    self._charge(self._start_sample(state, state.waiting.popleft()))
                    admitted += 1
            except InferenceError as error:
                self._fail(state, error, outcomes)
                continue
            except Exception as error:
                self._fail(
                    state, GenerationError("could not start generation", details=repr(error)), outcomes
                )
                continue
            if not state.waiting:
                self._pending.remove(state)
        return admitted

    def _condition(self, state: _RequestState) -> None:
        """Per-request work, done once: prompt encoding, image preprocessing, VAE encode."""
        pipe = self._pipe
        image = pipe.image_processor.preprocess(state.request.image)
        state.conditioning = self._adapter.condition(pipe, state.request, image)
        state.admitted_at = time.monotonic()

    def _schedule(self, steps: int):
        template = self._schedule_cache.get(steps)
        if template is None:
            template = copy.deepcopy(self._pipe.scheduler)
            template.set_timesteps(steps, device=self._pipe.device)
            self._schedule_cache[steps] = template
        return copy.deepcopy(template)

    def _start_sample(self, state: _RequestState, index: int) -> _Sample:
        request = state.request
        scheduler = self._schedule(request.steps)
        if self._adapter.uses_strength:
            timesteps, clamped = strength_timesteps(scheduler, request.steps, request.strength)
            if clamped and not state.warnings:
                state.warnings.append("strength × steps is below one step; ran one denoising step")
        else:
            timesteps = scheduler.timesteps
        generator = torch.Generator(device="cpu").manual_seed(request.seeds[index])
        latents = self._adapter.start_latents(self._pipe, state.conditioning, scheduler, timesteps, generator)
        sample = _Sample(state, index, generator, scheduler, timesteps, latents)
        self._active.setdefault(state.bucket, []).append(sample)
        state.active_samples += 1
        state.steps_total += len(timesteps)
        return sample

    def _next_bucket(self) -> tuple[int, int] | None:
        """Round-robin over latent-size buckets: the one served longest ago goes next."""
        if not self._active:
            return None
        return min(self._active, key=lambda b: self._served_at.get(b, -1))

    # ---- one denoising step ----------------------------------------------------------------------

    def _is_exact(self, sample: _Sample) -> bool:
        return self.config.exact or sample.state.request.exact

    def _unet_calls(self, samples: list[_Sample]) -> list[list[_Sample]]:
        """How the bucket's samples are split into UNet calls: one call, except in exact mode.

        On CPU a convolution over a batch of 1 takes another kernel than over a larger batch, so
        an exact one-row sample (no guidance) must run alone to equal its batch-1 stock call;
        samples of 2 or 3 rows are batch-invariant once the time-embedding GEMMs are chunked.
        """
        alone = [s for s in samples if s.rows == 1 and self._is_exact(s)]
        shared = [s for s in samples if not (s.rows == 1 and self._is_exact(s))]
        return [[s] for s in alone] + ([shared] if shared else [])

    def _denoise(self, samples: list[_Sample], outcomes: list[Outcome]) -> None:
        for group in self._unet_calls(samples):
            try:
                self._denoise_batch(group)
            except Exception:
                for sample in group:
                    try:
                        self._denoise_batch([sample])
                    except Exception as error:
                        self._fail(
                            sample.state, GenerationError("denoising failed", details=repr(error)), outcomes
                        )

    def _denoise_batch(self, samples: list[_Sample]) -> None:
        model_input, timesteps, hidden, added = [], [], [], {}
        for sample in samples:
            cond = sample.state.conditioning
            expanded = torch.cat([sample.latents] * cond.rows) if cond.rows > 1 else sample.latents
            scaled = sample.scheduler.scale_model_input(expanded, sample.timestep)
            model_input.append(self._adapter.unet_input(cond, scaled))
            timesteps.append(sample.timestep.expand(cond.rows))
            hidden.append(cond.encoder_hidden_states)
            for key, value in (cond.added_cond or {}).items():
                added.setdefault(key, []).append(value)
        exact = any(self._is_exact(s) for s in samples)
        with row_groups([s.rows for s in samples] if exact else None):
            noise_pred = self._pipe.unet(
                torch.cat(model_input),
                torch.cat(timesteps),
                encoder_hidden_states=torch.cat(hidden),
                added_cond_kwargs={k: torch.cat(v) for k, v in added.items()} or None,
                return_dict=False,
            )[0]
        guided = []
        for sample, rows in zip(samples, torch.split(noise_pred, [s.rows for s in samples]), strict=True):
            guided.append(self._adapter.guide(sample.state.conditioning, rows))
        if not (self.config.vectorise and vectorised_step(samples, guided)):
            for sample, eps in zip(samples, guided, strict=True):
                sample.latents = sample.scheduler.step(
                    eps, sample.timestep, sample.latents, **self._step_kwargs(sample), return_dict=False
                )[0]
        for sample in samples:
            sample.position += 1
            sample.state.steps_done += 1

    def _step_kwargs(self, sample: _Sample) -> dict:
        kwargs = {}
        if self._step_takes_eta:
            kwargs["eta"] = 0.0
        if self._step_takes_generator:
            kwargs["generator"] = sample.generator
        return kwargs

    # ---- leaving the engine ----------------------------------------------------------------------

    def _finish(self, bucket: tuple[int, int], finished: list[_Sample], outcomes: list[Outcome]) -> None:
        self._active[bucket] = [s for s in self._active[bucket] if not s.done]
        if not self._active[bucket]:
            del self._active[bucket]
        exact = [s for s in finished if self._is_exact(s)]
        batched = [s for s in finished if s not in exact]
        groups = [[s] for s in exact] + ([batched] if batched else [])
        for group in groups:
            try:
                pixels = self._adapter.decode(self._pipe, torch.cat([s.latents for s in group]))
                images = self._pipe.image_processor.postprocess(
                    pixels, output_type=self._output_type, do_denormalize=[True] * len(group)
                )
            except Exception as error:
                for sample in group:
                    self._fail(
                        sample.state, GenerationError("decoding failed", details=repr(error)), outcomes
                    )
                continue
            for sample, image in zip(group, images, strict=True):
                self._complete_sample(sample, image, outcomes)

    def _complete_sample(self, sample: _Sample, image, outcomes: list[Outcome]) -> None:
        state = sample.state
        if state.failed is not None or state.request.request_id not in self._requests:
            return
        state.images[sample.index] = image
        state.active_samples -= 1
        if state.waiting or state.active_samples:
            return
        self._requests.pop(state.request.request_id, None)
        now = time.monotonic()
        result = GenerationResult(
            request_id=state.request.request_id,
            images=tuple(state.images),
            seeds=state.request.seeds,
            unet_steps=state.steps_total,
            queue_wait_s=(state.admitted_at or now) - state.submitted_at,
            run_s=now - (state.admitted_at or now),
            compute_s=state.compute_s,
            warnings=tuple(state.warnings),
        )
        outcomes.append(Outcome(state.request.request_id, result=result))

    def _fail(self, state: _RequestState, error: InferenceError, outcomes: list[Outcome]) -> None:
        if state.failed is not None:
            return
        state.failed = error
        self._drop(state)
        outcomes.append(Outcome(state.request.request_id, error=error))
