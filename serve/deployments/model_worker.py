"""The model replica: one loaded pipeline, one batching engine, one background step loop.

Requests arrive on the replica's event loop, are handed to the engine (``submit`` only posts to
its inbox) and awaited on a future. A background task runs ``engine.step()`` on a dedicated thread
so the event loop stays free to accept requests, answer health checks and notice cancellations;
between steps the engine admits newcomers and releases finished samples, whose futures are resolved
here. Not ``@serve.batch``: that runs whole requests to completion, so newcomers would wait for the
slowest member of a batch and mixed parameters would rarely share a step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from inference.errors import GenerationError, RequestCancelledError
from inference.types import GenerationRequest, GenerationResult, Progress

logger = logging.getLogger("serve.deployments.model_worker")


class ModelWorker:
    """Ray Serve deployment class (wrapped by ``serve.deployment`` in ``serve.app``)."""

    def __init__(
        self,
        spec: dict[str, Any],
        torch_threads: int | None = None,
        optimize: dict[str, Any] | None = None,
    ) -> None:
        """Load, optimise and warm up before returning: Serve routes nothing to a replica whose
        constructor has not finished, so no request ever waits for a compile. The engine knobs arrive
        once, as Serve's ``user_config``: Serve calls ``reconfigure`` right after this constructor,
        before the replica takes a request, and again on every change."""
        import torch  # only model replicas load torch; the ingress never does

        from inference.engine import EngineConfig, StepBatchingEngine
        from inference.engine_config import OptimizeConfig
        from inference.models import ModelSpec
        from inference.optimize import apply_optimize_config
        from inference.pipelines import load_pipeline
        from serve.observability.metrics import WorkerMetrics

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.spec = ModelSpec(**spec)
        optimize_config = OptimizeConfig(**(optimize or {}))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(self.spec, device)
        applied = apply_optimize_config(pipe, optimize_config)
        self._engine = StepBatchingEngine(pipe, self.spec.family, EngineConfig(), optimize=optimize_config)
        self._warmed = self._warm_up(optimize_config)
        logger.info("model %s optimisations: %s; %d shapes warmed", self.spec.id, applied, self._warmed)
        self._metrics = WorkerMetrics(self.spec.id)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.spec.id}")
        self._futures: dict[str, asyncio.Future] = {}  # by engine run id
        self._progress_queues: dict[str, asyncio.Queue] = {}  # by engine run id
        self._runs: dict[str, str] = {}  # a request id → the engine run serving its newest caller
        self._run_numbers = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        logger.info("model %s loaded on %s (pid %s)", self.spec.id, device, os.getpid())

    def _warm_up(self, optimize_config) -> int:
        if not optimize_config.warmup_shapes:
            return 0
        from ray import serve

        from serve.deployments.warmup_status import WarmupReporter

        context = serve.get_replica_context()
        reporter = WarmupReporter(context.app_name, self.spec.id, context.replica_id.unique_id)
        reporter(0, optimize_config.warmup_shapes)
        try:
            return self._engine.warm_up(reporter)
        finally:
            reporter.clear()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve ``user_config`` → engine knobs, live; running samples are not disturbed."""
        from inference.engine import EngineConfig

        self._engine.reconfigure(EngineConfig(**user_config))
        logger.info("model %s engine reconfigured: %s", self.spec.id, self._engine.config)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Queue ``request`` for the engine and wait for its images; cancellation leaves the engine too."""
        stream = self.generate_stream(request, with_progress=False)
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    async def generate_stream(self, request: GenerationRequest, with_progress: bool = True):
        """Like ``generate``, but yields ``Progress`` after each denoising step, then the result.

        Ray Serve streams these items to the caller (``handle.options(stream=True)``); when the caller
        goes away the generator is cancelled and the request leaves the engine at its next step.

        Each call is its own engine run. A request id that arrives while an earlier call for it still
        runs is a retry whose first caller is gone or gave up (a job coordinator killed mid-job, whose
        stream Ray has not cancelled yet, and the coordinator that took the job over): the newest
        caller wins, as with job leases, and the older run is canceled. Generation is a pure function
        of the request, so nothing is lost but the steps the old run had done.
        """
        self._ensure_loop()
        run_id = f"{request.request_id}#{next(self._run_numbers)}"
        superseded = self._runs.get(request.request_id)
        if superseded is not None:
            logger.warning("request %s arrived again; canceling its older run", request.request_id)
            self._engine.cancel(superseded)
        future = asyncio.get_running_loop().create_future()
        updates: asyncio.Queue | None = asyncio.Queue() if with_progress else None
        self._futures[run_id] = future
        if updates is not None:
            self._progress_queues[run_id] = updates
        self._engine.submit(replace(request, request_id=run_id))
        self._runs[request.request_id] = run_id
        self._metrics.set_inflight(len(self._futures))
        self._wakeup.set()
        try:
            while updates is not None and not future.done():
                waiter = asyncio.ensure_future(updates.get())
                await asyncio.wait({waiter, future}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield waiter.result()
                else:
                    waiter.cancel()
            yield replace(await future, request_id=request.request_id)
        except (asyncio.CancelledError, GeneratorExit):
            if not future.done():
                self._engine.cancel(run_id)
                self._wakeup.set()
            raise
        finally:
            self._futures.pop(run_id, None)
            self._progress_queues.pop(run_id, None)
            if self._runs.get(request.request_id) == run_id:
                del self._runs[request.request_id]
            self._metrics.set_inflight(len(self._futures))

    async def cancel(self, request_id: str) -> None:
        run_id = self._runs.get(request_id)
        if run_id is not None:
            self._engine.cancel(run_id)
        if self._wakeup:
            self._wakeup.set()

    async def progress(self, request_id: str) -> Progress | None:
        run_id = self._runs.get(request_id)
        return self._engine.progress(run_id) if run_id is not None else None

    async def ready(self) -> dict[str, Any]:
        return {
            "model": self.spec.id,
            "queued": self._engine.queued_requests,
            "active": self._engine.active_samples,
            "warmed_shapes": self._warmed,
            "lowered_caps": {f"{h}x{w}": cap for (h, w), cap in self._engine.effective_caps().items()},
        }

    def check_health(self) -> None:
        """Serve's health probe: a dead step loop means this replica can never finish work."""
        if self._loop_task is not None and self._loop_task.done():
            raise RuntimeError(f"engine loop of {self.spec.id} stopped: {self._loop_task.exception()!r}")

    def _ensure_loop(self) -> None:
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """The step loop. It must outlive any error: a failed step fails the requests in flight with
        a GenerationError; a failing metric or progress update is logged and skipped."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._engine.has_work:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outcomes, stats = await loop.run_in_executor(self._executor, self._engine.step)
            except Exception as error:
                logger.exception("engine step failed; failing the requests in flight")
                self._fail_all(GenerationError("the engine failed", details=repr(error)[:300]))
                continue
            try:
                self._after_step(stats)
            except Exception:
                logger.exception("step bookkeeping failed")
            for outcome in outcomes:
                self._resolve(outcome)

    def _after_step(self, stats) -> None:
        if stats is not None:
            self._metrics.step(stats, self._engine.config.max_batch_samples, self._engine.effective_caps())
        for request_id, updates in self._progress_queues.items():
            progress = self._engine.progress(request_id)
            if progress is not None:
                previews = self._engine.take_previews(request_id)
                updates.put_nowait(replace(progress, previews=previews) if previews else progress)

    def _fail_all(self, error: GenerationError) -> None:
        for request_id, future in list(self._futures.items()):
            self._engine.cancel(request_id)
            if not future.done():
                future.set_exception(error)

    def _resolve(self, outcome) -> None:
        future = self._futures.get(outcome.request_id)
        try:
            if outcome.error is None:
                self._metrics.finished(len(outcome.result.images), outcome.result.queue_wait_s)
            elif not isinstance(outcome.error, RequestCancelledError):  # a caller leaving is no failure
                self._metrics.failed()
        except Exception:
            logger.exception("metrics update failed")
        if future is None or future.done():
            return
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.result)
