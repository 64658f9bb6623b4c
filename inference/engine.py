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
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from PIL import Image

from inference.engine_config import EngineConfig, OptimizeConfig
from inference.errors import (
    GenerationError,
    InferenceError,
    InvalidInputError,
    OutOfMemoryError,
    RequestCancelledError,
)
from inference.exact import install_row_chunking, row_groups
from inference.families import ADAPTERS, Conditioning, strength_timesteps
from inference.memory import BucketCaps, is_out_of_memory, release_cached_memory
from inference.models import Family
from inference.previews import LatentPreviewer
from inference.schedulers import vectorised_step
from inference.text_policy import check_request_text
from inference.types import GenerationRequest, GenerationResult, Preview, Progress

logger = logging.getLogger("inference.engine")


@dataclass(frozen=True)
class StepStats:
    """What one ``step()`` did, for metrics: the real batch size and where the time went.

    ``step_s`` is the whole step; ``unet_s`` the denoising part (UNet calls, guidance, scheduler
    steps: what a request's compute share is cut from); ``forward_s`` the UNet forward calls alone,
    so ``step_s - forward_s`` is the engine's own host work (admission, input assembly, guidance,
    scheduler, decode). On CUDA, ``forward_s`` times the launch, not the kernels (no syncs here).
    """

    bucket: tuple[int, int]
    samples: int
    rows: int
    admitted: int
    finished: int
    unet_s: float
    step_s: float
    forward_s: float = 0.0
    unet_calls: int = 1
    padded_rows: int = 0
    oom_splits: int = 0
    previews: int = 0
    preview_s: float = 0.0  # making them (inside step_s): what watching a request costs the batch


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
    previews: dict[int, Preview] = field(default_factory=dict)  # the newest per image, until taken

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
        self,
        pipe,
        family: Family | str,
        config: EngineConfig | None = None,
        *,
        optimize: OptimizeConfig | None = None,
        output_type: str = "pil",
    ) -> None:
        """``output_type="np"`` returns float arrays in [0, 1] instead of PIL images: tests compare
        those against the stock pipeline bit for bit, before 8-bit quantisation hides differences.
        ``optimize`` brings the row buckets that UNet calls are padded to (see ``OptimizeConfig``)."""
        self._pipe = pipe
        self._optimize = optimize or OptimizeConfig()
        self._caps = BucketCaps()
        self._step_report = {"calls": 0, "padded_rows": 0, "oom_splits": 0, "forward_s": 0.0}
        self._output_type = output_type
        self._family = Family(family)
        self._adapter = ADAPTERS[self._family]
        self.config = config or EngineConfig()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[_RequestState] = []
        self._step_s: dict[tuple[int, int], float] = {}  # moving average of a step, per image size
        self._requests: dict[str, _RequestState] = {}
        self._active: dict[tuple[int, int], list[_Sample]] = {}
        self._served_at: dict[tuple[int, int], int] = {}
        self._served: dict[str, float] = {}
        self._schedule_cache: dict[int, object] = {}
        self._order = itertools.count()
        self._iteration = 0
        self._vae_scale = int(getattr(pipe, "vae_scale_factor", 8))
        self._size_multiple = self._vae_scale * self._adapter.token_patch(pipe)
        step_params = inspect.signature(pipe.scheduler.step).parameters
        self._step_takes_eta = "eta" in step_params
        self._step_takes_generator = "generator" in step_params
        self._previewer: LatentPreviewer | None = None
        install_row_chunking(self._adapter.denoiser(pipe))

    # ---- called from any thread ------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it is admitted between steps. Shape and text errors are raised here, at once."""
        check_request_text(request)  # the APIs' text policy, again: nothing unbounded reaches a tokenizer
        if request.width % self._size_multiple or request.height % self._size_multiple:
            raise InvalidInputError(
                f"image size {request.width}x{request.height} must be a multiple of {self._size_multiple}",
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
        position = self._queue_position(state)
        return Progress(state.steps_done, state.steps_total, position, self._eta_s(state, position))

    def take_previews(self, request_id: str) -> tuple[Preview, ...]:
        """The previews made for ``request_id`` since the last call (the newest per image); call it
        between steps, from the thread that drives them or while no step runs."""
        state = self._requests.get(request_id)
        if state is None or not state.previews:
            return ()
        previews, state.previews = tuple(state.previews.values()), {}
        return previews

    def _admission_key(self, state: _RequestState) -> tuple:
        """The order ``_next_candidate`` admits in (lane, then fairness or arrival)."""
        if self.config.admission == "fifo":
            return (state.request.priority, state.order)
        return (state.request.priority, self._served.get(state.request.tenant, 0.0), state.order)

    def _queue_position(self, state: _RequestState) -> int | None:
        if state.admitted_at is not None:
            return None
        queued = [s for s in list(self._pending) if s.admitted_at is None]
        key = self._admission_key(state)
        return sum(1 for other in queued if other is not state and self._admission_key(other) < key)

    def _remaining_steps(self, state: _RequestState) -> int:
        """Sample-steps ``state`` still needs (all its images)."""
        total = state.steps_total or self._sample_steps(state.request) * state.request.num_images
        return max(0, total - state.steps_done)

    def _eta_s(self, state: _RequestState, position: int | None) -> float | None:
        step_s = self._step_s.get(state.bucket) or (min(self._step_s.values()) if self._step_s else None)
        if step_s is None:
            return None
        own = -(-self._remaining_steps(state) // max(1, state.request.num_images)) * step_s
        if position is None:
            return own
        key = self._admission_key(state)
        ahead = sum(
            self._remaining_steps(other)
            for other in list(self._requests.values())
            if other is not state and (other.admitted_at is not None or self._admission_key(other) < key)
        )
        return own + ahead / max(1, self.config.max_batch_samples) * step_s

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
        self._step_report = {"calls": 0, "padded_rows": 0, "oom_splits": 0, "forward_s": 0.0}
        denoise_started = time.perf_counter()
        with torch.inference_mode():
            self._denoise(samples, outcomes)
            unet_s = time.perf_counter() - denoise_started
            self._attribute(samples, unet_s)
            previews, preview_s = self._make_previews(samples, bucket)
            finished = [s for s in samples if s.done]
            if finished:
                self._finish(bucket, finished, outcomes)
        self._iteration += 1
        self._served_at[bucket] = self._iteration
        step_s = time.perf_counter() - started
        if not admitted:  # a plain denoising step: admissions (prompt and VAE encodes) are one-offs
            previous = self._step_s.get(bucket)
            self._step_s[bucket] = step_s if previous is None else 0.8 * previous + 0.2 * step_s
        stats = StepStats(
            bucket=bucket,
            samples=len(samples),
            rows=sum(s.rows for s in samples),
            admitted=admitted,
            finished=len(finished),
            unet_s=unet_s,
            step_s=step_s,
            forward_s=self._step_report["forward_s"],
            unet_calls=self._step_report["calls"],
            padded_rows=self._step_report["padded_rows"],
            oom_splits=self._step_report["oom_splits"],
            previews=previews,
            preview_s=preview_s,
        )
        return outcomes, stats

    def _make_previews(self, samples: list[_Sample], bucket: tuple[int, int]) -> tuple[int, float]:
        """Previews for the running samples whose request asked for one at this step, in one batch.

        A failed preview is logged and skipped: it must never cost a request its images."""
        due = [s for s in samples if not s.done and s.state.failed is None and self._preview_due(s)]
        if not due:
            return 0, 0.0
        started = time.perf_counter()
        try:
            images = self.previewer.render(torch.cat([s.latents for s in due]), bucket)
        except Exception:
            logger.exception("preview failed; the samples go on without one")
            return 0, time.perf_counter() - started
        for sample, image in zip(due, images, strict=True):
            steps = len(sample.timesteps)
            sample.state.previews[sample.index] = Preview(sample.index, sample.position, steps, image)
        return len(due), time.perf_counter() - started

    def _preview_due(self, sample: _Sample) -> bool:
        every = sample.state.request.preview_every
        return every > 0 and sample.position % max(every, self.config.preview_min_steps) == 0

    @property
    def previewer(self) -> LatentPreviewer:
        """The preview maker for the configured method and size (rebuilt when they change)."""
        method, side = self.config.preview_method, self.config.preview_max_side
        if self._previewer is None:
            self._previewer = LatentPreviewer(self._pipe, self._adapter, method, side)
        self._previewer = self._previewer.configured(method, side)
        return self._previewer

    def effective_caps(self) -> dict[tuple[int, int], int]:
        """Buckets whose sample cap an out-of-memory error lowered, with the cap in force now."""
        return self._caps.snapshot()

    def warm_up(self, on_progress=None) -> int:
        """Run every (row bucket, warm-up size) UNet shape once, before any request; returns the count.

        With a compiled UNet this is where each shape compiles, so no request pays for it. The
        warm-up goes through the real admission and denoising code with throwaway one-row samples
        (guidance off), so inputs have exactly the dtypes and layouts that requests will bring.
        ``on_progress(done, total)`` is called after each shape.
        """
        sizes, buckets = self._optimize.warmup_sizes, self._optimize.row_buckets or ()
        total, done = len(sizes) * len(buckets), 0
        for height, width in sizes:
            request = GenerationRequest(
                request_id=f"warm-up-{height}x{width}",
                model="warm-up",
                prompt="warm-up",
                image=Image.new("RGB", (width, height), (127, 127, 127)),
                seed=0,
                strength=1.0,
                steps=2,
                guidance_scale=1.0,
                image_guidance_scale=1.0,
            )
            state = _RequestState(request, time.monotonic(), -1, deque())
            with torch.inference_mode():
                failures = self._condition_states([state])
                if failures:
                    raise failures[0][1]
                for rows in buckets:
                    self._denoise_batch([self._new_sample(state, 0) for _ in range(rows)])
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total)
        return done

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

    def _next_candidate(self, blocked: set[tuple[int, int]], taken: dict[int, int]) -> _RequestState | None:
        """The request whose next sample is admitted next.

        Priority first: a request of a higher lane (``GenerationRequest.priority``) is admitted before
        any of a lower one. Within a lane, ``fifo``: the oldest waiting request; ``fair``: the oldest
        waiting request of the tenant that has received the least denoising work (rows × latent area ×
        steps), so a tenant with a deep backlog cannot starve one that just arrived. A request never
        overtakes an older one of the same bucket that did not fit (``blocked``), which keeps order
        within a bucket.
        """
        candidates = [
            state
            for state in self._pending
            if state.bucket not in blocked and len(state.waiting) > taken.get(id(state), 0)
        ]
        if not candidates:
            return None
        if self.config.admission == "fifo":
            return min(candidates, key=lambda st: (st.request.priority, st.order))
        return min(
            candidates,
            key=lambda st: (st.request.priority, self._served.get(st.request.tenant, 0.0), st.order),
        )

    def _charge(self, state: _RequestState, rows: int) -> None:
        area = (state.bucket[0] // self._vae_scale) * (state.bucket[1] // self._vae_scale)
        tenant = state.request.tenant
        self._served[tenant] = self._served.get(tenant, 0.0) + rows * area * self._sample_steps(state.request)

    def _sample_steps(self, request: GenerationRequest) -> int:
        """UNet steps one sample of ``request`` will take (``strength_timesteps`` without a scheduler)."""
        template = self._schedule_template(request)
        if not self._adapter.uses_strength:
            return len(template.timesteps)
        start, _ = self._adapter.first_step(request.steps, request.strength)
        return len(template.timesteps) - start * template.order

    def _start_account(self, tenant: str) -> None:
        """A tenant that (re)appears starts level with the least-served busy tenant: idling is no credit."""
        busy = {st.request.tenant for st in self._requests.values()} - {tenant}
        floor = min((self._served.get(t, 0.0) for t in busy), default=0.0)
        self._served[tenant] = max(self._served.get(tenant, 0.0), floor)

    def _bucket_cap(self, bucket: tuple[int, int]) -> int:
        """Samples one UNet call of ``bucket`` may take: the configured cap, or lower after an OOM."""
        lowered = self._caps.cap(bucket)
        cap = self.config.max_batch_samples
        return cap if lowered is None else min(cap, lowered)

    def _fits(self, bucket: tuple[int, int], rows: int, planned: tuple[int, int] = (0, 0)) -> bool:
        """Whether a sample of ``rows`` rows joins ``bucket``, counting ``planned`` (samples, rows)
        already chosen in this admission round."""
        samples = self._active.get(bucket, [])
        count = len(samples) + planned[0]
        used_rows = sum(s.rows for s in samples) + planned[1]
        if count >= self.config.max_batch_samples:
            return False
        if not count:
            return True  # a lone sample is always admitted, or an oversized request would wait forever
        max_rows = self._optimize.max_rows
        if max_rows is not None and used_rows + rows > max_rows:
            return False
        if self.config.max_batch_row_area is None:
            return True
        area = (bucket[0] // self._vae_scale) * (bucket[1] // self._vae_scale)
        return (used_rows + rows) * area <= self.config.max_batch_row_area

    def _admit(self, outcomes: list[Outcome]) -> int:
        """Admit waiting samples in three phases: choose who fits (by policy, without touching the
        model), condition every newly chosen request at once (one VAE encode per image size), then
        start the chosen samples."""
        plan = self._plan_admissions()
        fresh = list({id(st): st for st in plan if st.conditioning is None}.values())
        for state, error in self._condition_states(fresh) if fresh else ():
            self._fail(state, error, outcomes)
        admitted = 0
        for state in plan:
            if state.failed is not None or state.request.request_id not in self._requests:
                continue
            try:
                with torch.inference_mode():
                    self._start_sample(state, state.waiting.popleft())
                admitted += 1
            except Exception as error:
                self._fail(state, _admission_error(error), outcomes)
                continue
            if not state.waiting and state in self._pending:
                self._pending.remove(state)
        return admitted

    def _plan_admissions(self) -> list[_RequestState]:
        """The samples to admit this step, one entry per sample, in admission order."""
        plan: list[_RequestState] = []
        taken: dict[int, int] = {}
        planned: dict[tuple[int, int], tuple[int, int]] = {}
        blocked: set[tuple[int, int]] = set()
        while (state := self._next_candidate(blocked, taken)) is not None:
            rows, bucket = self._rows(state), state.bucket
            if not self._fits(bucket, rows, planned.get(bucket, (0, 0))):
                blocked.add(bucket)
                continue
            count, used = planned.get(bucket, (0, 0))
            planned[bucket] = (count + 1, used + rows)
            taken[id(state)] = taken.get(id(state), 0) + 1
            self._charge(state, rows)
            plan.append(state)
        return plan

    def _rows(self, state: _RequestState) -> int:
        if state.conditioning is not None:
            return state.conditioning.rows
        return self._adapter.rows(self._pipe, state.request)

    def _condition_states(self, states: list[_RequestState]) -> list[tuple[_RequestState, InferenceError]]:
        """Per-request work, done once: prompt encoding per request, then ONE VAE encode for all the
        images of a size (exact mode: one per request, as stock does). A request whose conditioning
        fails is returned with its error; the others are unaffected."""
        failures: list[tuple[_RequestState, InferenceError]] = []
        groups: dict[object, list] = {}
        with torch.inference_mode():
            for state in states:
                try:
                    image = self._pipe.image_processor.preprocess(state.request.image)
                    entry = (state, self._adapter.encode_prompt(self._pipe, state.request), image)
                except Exception as error:
                    failures.append((state, _admission_error(error)))
                    continue
                key = id(state) if self._is_exact_request(state) else state.bucket
                groups.setdefault(key, []).append(entry)
            for group in groups.values():
                failures += self._encode_images(group)
        return failures

    def _encode_images(self, group: list) -> list[tuple[_RequestState, InferenceError]]:
        try:
            conds = [cond for _, cond, _ in group]
            self._adapter.encode_images(self._pipe, conds, torch.cat([image for *_, image in group]))
        except Exception as error:
            if len(group) == 1:
                return [(group[0][0], _admission_error(error))]
            failures = []
            for entry in group:  # isolate the request that broke the shared encode
                failures += self._encode_images([entry])
            return failures
        now = time.monotonic()
        for state, cond, _ in group:
            state.conditioning = cond
            state.admitted_at = now
        return []

    def _schedule_template(self, request: GenerationRequest):
        """The scheduler set for ``request``'s steps (and, for flow-matching families, its size)."""
        key = self._adapter.schedule_key(request)
        template = self._schedule_cache.get(key)
        if template is None:
            template = copy.deepcopy(self._pipe.scheduler)
            self._adapter.set_timesteps(self._pipe, template, request)
            self._schedule_cache[key] = template
        return template

    def _schedule(self, request: GenerationRequest):
        return copy.deepcopy(self._schedule_template(request))

    def _start_sample(self, state: _RequestState, index: int) -> _Sample:
        sample = self._new_sample(state, index)
        self._active.setdefault(state.bucket, []).append(sample)
        state.active_samples += 1
        state.steps_total += len(sample.timesteps)
        return sample

    def _new_sample(self, state: _RequestState, index: int) -> _Sample:
        """A sample of ``state`` at its first timestep: its own scheduler, generator and latents."""
        request = state.request
        scheduler = self._schedule(request)
        if self._adapter.uses_strength:
            timesteps, clamped = strength_timesteps(self._adapter, scheduler, request.steps, request.strength)
            if clamped and not state.warnings:
                state.warnings.append("strength × steps is below one step; ran one denoising step")
        else:
            timesteps = scheduler.timesteps
        generator = torch.Generator(device="cpu").manual_seed(request.seeds[index])
        latents = self._adapter.start_latents(self._pipe, state.conditioning, scheduler, timesteps, generator)
        return _Sample(state, index, generator, scheduler, timesteps, latents)

    def _next_bucket(self) -> tuple[int, int] | None:
        """Round-robin over latent-size buckets: the one served longest ago goes next."""
        if not self._active:
            return None
        return min(self._active, key=lambda b: self._served_at.get(b, -1))

    # ---- one denoising step ----------------------------------------------------------------------

    def _is_exact(self, sample: _Sample) -> bool:
        return self._is_exact_request(sample.state)

    def _is_exact_request(self, state: _RequestState) -> bool:
        return self.config.exact or state.request.exact

    def _unet_calls(self, samples: list[_Sample]) -> list[list[_Sample]]:
        """How the bucket's samples are split into UNet calls: one call, except in exact mode.

        On CPU a convolution over a batch of 1 takes another kernel than over a larger batch, so
        an exact one-row sample (no guidance) must run alone to equal its batch-1 stock call;
        samples of 2 or 3 rows are batch-invariant once the time-embedding GEMMs are chunked. The
        transformer families (sd3, flux) have batch-variant GEMMs everywhere: their exact samples
        each run alone.
        """
        batch_invariant = self._adapter.exact_in_batches  # else every exact sample runs alone

        def runs_alone(sample: _Sample) -> bool:
            return self._is_exact(sample) and (sample.rows == 1 or not batch_invariant)

        alone = [s for s in samples if runs_alone(s)]
        shared = [s for s in samples if not runs_alone(s)]
        cap = self._bucket_cap(samples[0].state.bucket) if samples else 1
        chunks = [shared[i : i + cap] for i in range(0, len(shared), cap)]  # a lowered cap after an OOM
        return [[s] for s in alone] + chunks

    def _denoise(self, samples: list[_Sample], outcomes: list[Outcome]) -> None:
        for group in self._unet_calls(samples):
            self._denoise_group(group, outcomes)

    def _denoise_group(self, group: list[_Sample], outcomes: list[Outcome]) -> None:
        """One UNet call; on out-of-memory split it in halves (and lower the bucket's cap), on any
        other error retry each sample alone so only the one that breaks fails."""
        try:
            self._denoise_batch(group)
            return
        except Exception as error:
            if not is_out_of_memory(error):
                self._denoise_alone(group, outcomes)
                return
        release_cached_memory()
        self._step_report["oom_splits"] += 1
        if len(group) == 1:
            self._fail(group[0].state, _out_of_memory(group[0].state), outcomes)
            return
        self._caps.lower(group[0].state.bucket, len(group))
        half = (len(group) + 1) // 2
        self._denoise_group(group[:half], outcomes)
        self._denoise_group(group[half:], outcomes)

    def _denoise_alone(self, group: list[_Sample], outcomes: list[Outcome]) -> None:
        for sample in group:
            if sample.state.failed is not None:
                continue
            try:
                self._denoise_batch([sample])
            except Exception as error:
                failure = (
                    _out_of_memory(sample.state)
                    if is_out_of_memory(error)
                    else GenerationError("denoising failed", details=repr(error))
                )
                self._fail(sample.state, failure, outcomes)

    def _denoise_batch(self, samples: list[_Sample]) -> None:
        parts: dict[str, list[torch.Tensor]] = {}
        for sample in samples:
            cond = sample.state.conditioning
            expanded = torch.cat([sample.latents] * cond.rows) if cond.rows > 1 else sample.latents
            rows = self._adapter.model_rows(cond, sample.scheduler, expanded, sample.timestep)
            for key, value in rows.items():
                parts.setdefault(key, []).append(value)
        exact = any(self._is_exact(s) for s in samples)
        groups = [s.rows for s in samples]
        padding = 0 if exact else self._optimize.padded_rows(sum(groups)) - sum(groups)
        if padding:  # repeat the last row up to the bucket; its outputs are dropped below
            for values in parts.values():
                values.append(values[-1][-1:].expand(padding, *values[-1].shape[1:]))
        inputs = {key: torch.cat(values) for key, values in parts.items()}
        if not exact or self._optimize.compile != "off":
            # One memory layout for every call: a compiled model guards on strides, and latents
            # inherit whatever layout the VAE's convolutions chose. (Exact mode keeps the layout
            # stock passes: oneDNN picks its convolution kernel by layout.)
            layout = torch.channels_last if self._optimize.channels_last else torch.contiguous_format
            key = self._adapter.latent_input
            if inputs[key].dim() == 4:
                inputs[key] = inputs[key].contiguous(memory_format=layout)
            else:
                inputs[key] = inputs[key].contiguous()
        forward_started = time.perf_counter()
        with row_groups(groups if exact else None):
            noise_pred = self._adapter.call_model(self._pipe, inputs, samples[0].state.conditioning)
        noise_pred = noise_pred[: sum(groups)]
        self._step_report["forward_s"] += time.perf_counter() - forward_started
        self._step_report["calls"] += 1
        self._step_report["padded_rows"] += padding
        if exact:  # the stock formula per sample, with Python-float scales
            guided = [
                self._adapter.guide(sample.state.conditioning, rows)
                for sample, rows in zip(samples, torch.split(noise_pred, groups), strict=True)
            ]
        else:
            guided = self._adapter.guide_batch([s.state.conditioning for s in samples], noise_pred)
        # Exact mode steps each sample with its own scheduler: the stock step's own arithmetic, which
        # the vectorised step equals bit for bit only in float32 (see inference.schedulers).
        if exact or not (self.config.vectorise and vectorised_step(samples, guided)):
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
            self._decode_group(group, outcomes)

    def _decode_group(self, group: list[_Sample], outcomes: list[Outcome]) -> None:
        """Decode finished samples in one VAE call; an out-of-memory error splits the call in halves."""
        try:
            latents = torch.cat([s.latents for s in group])
            pixels = self._adapter.decode(self._pipe, latents, group[0].state.bucket)
            images = self._pipe.image_processor.postprocess(
                pixels, output_type=self._output_type, do_denormalize=[True] * len(group)
            )
        except Exception as error:
            if is_out_of_memory(error) and len(group) > 1:
                release_cached_memory()
                half = len(group) // 2
                self._decode_group(group[:half], outcomes)
                self._decode_group(group[half:], outcomes)
                return
            for sample in group:
                failure = (
                    _out_of_memory(sample.state)
                    if is_out_of_memory(error)
                    else GenerationError("decoding failed", details=repr(error))
                )
                self._fail(sample.state, failure, outcomes)
            return
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


def _admission_error(error: Exception) -> InferenceError:
    if isinstance(error, InferenceError):
        return error
    if is_out_of_memory(error):
        return OutOfMemoryError("out of accelerator memory while preparing the request")
    return GenerationError("could not start generation", details=repr(error))


def _out_of_memory(state: _RequestState) -> GenerationError:
    request = state.request
    return OutOfMemoryError(
        f"out of accelerator memory: one {request.width}x{request.height} image does not fit even alone"
    )
