"""Runs durable jobs: asynchronous requests and idempotent ones, one coordinator for all replicas.

Plain asyncio, no Ray: the ``JobCoordinator`` deployment (``serve/deployments/coordinator.py``) hosts one
``JobRunner`` in a single replica; unit tests host one in-process. A single owner makes idempotency
claims and cancellations race-free, and it only awaits (the GPU work happens in model replicas).
Every state change is written to the ``JobStore`` first, so a restarted coordinator resumes all
unfinished jobs from their records: an accepted job is never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from inference.errors import InferenceError
from inference.images import SourceImage
from inference.types import Progress
from serve.errors import IdempotencyConflictError, NotFoundError, ServingError, StorageUnavailableError
from serve.generation.calls import CompletedCall
from serve.generation.service import GenerationService
from serve.jobs.leases import Leases, LocalLeases
from serve.jobs.previews import LocalPreviewBoard, PreviewBoard, preview_frame
from serve.jobs.records import JobError, JobRecord, JobState, JobStore, StaleLeaseError, StoredOutput
from serve.jobs.webhooks import NO_SECRET, WebhookPolicy, deliver, webhook_payload, webhook_secret_for
from serve.outbound.fetch import FetchPolicy
from serve.tenancy.tenants import Tenant

logger = logging.getLogger(__name__)

#: The client-facing object of a job (the REST API's job view), as webhooks deliver it: the API layer
#: hands its renderer in, so the jobs core never imports an API module.
RenderJob = Callable[[JobRecord], Awaitable[dict[str, Any]]]

#: A job is run again after a ``transient`` error (``serve.errors``), up to MAX_RUNS runs in all.
MAX_RUNS = 3
REPLICA_WAIT_S = 120.0  # how long a retry waits for the model (or the store) to answer again
STORAGE_OUTAGE_RETRIES = 10  # storage failing the record itself: wait and start the job over this often
PROGRESS_SAVE_INTERVAL_S = 1.0
CANCEL_WAIT_S = 10.0  # how long a cancel waits for the job's runner (maybe another process) to stop


@dataclass
class JobRunner:
    service: GenerationService
    jobs: JobStore
    render: RenderJob  # the job object a webhook delivers (the same one GET returns)
    webhook_secret: bytes | None = field(default=None, repr=False)  # server key (IMG2IMG_WEBHOOK_SECRET)
    webhook_shared_secret: bool = False  # webhooks.shared_secret: sign with the server key itself
    webhook_policy: WebhookPolicy = field(default_factory=WebhookPolicy)
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    tenant_lookup: Callable[[str], Tenant | None] = lambda name: None
    leases: Leases = field(default_factory=LocalLeases)  # RedisLeases when coordinators scale out
    previews: PreviewBoard = field(default_factory=LocalPreviewBoard)  # running jobs' newest previews
    preview_every: int = 0  # previews.job_every_steps: a preview of each image every k steps (0: none)

    def __post_init__(self) -> None:
        self._tasks: dict[str, asyncio.Task] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._sources: dict[str, SourceImage] = {}  # decoded at the ingress, used once by _execute
        self._resumed = False
        self._tokens: dict[str, int] = {}  # fencing token of each job this process holds
        self._stale: set[str] = set()  # jobs whose lease was lost: stop without writing anything

    # ---- entry points (each an RPC of the coordinator deployment) ------------------------------

    async def accept(
        self,
        record: JobRecord,
        idempotency: tuple[str, str] | None = None,
        source: SourceImage | None = None,
    ) -> str:
        """Persist and start ``record``; with (key, fingerprint), a replay returns the original job id.

        ``source`` is the source image the ingress decoded: the job runs on it instead of decoding the
        stored copy again (decode once). A job resumed after a restart has none and decodes the store's.
        """
        if not self._resumed:  # once; shared coordinators rescan from their health checks
            await self.resume()
        if idempotency is not None:
            bound = await self.jobs.replayed_job(record.tenant, *idempotency)  # the durable binding
            if bound is None:  # a new key: one accept wins it, here or in another coordinator
                fingerprint, bound = await self.leases.bind_key(record.tenant, *idempotency, record.id)
                if fingerprint != idempotency[1]:
                    raise IdempotencyConflictError(
                        "this Idempotency-Key was already used with a different request body",
                        param="Idempotency-Key",
                    )
            if bound != record.id:
                await self._saved(record.tenant, bound)
                return bound
        await self.jobs.save(record)
        if idempotency is not None:
            await self.jobs.bind_idempotency(record.tenant, idempotency[0], idempotency[1], record.id)
        if source is not None:
            self._sources[record.id] = source
        self._start(record.tenant, record.id)
        return record.id

    async def _saved(self, tenant: str, job_id: str, timeout_s: float = 10.0) -> None:
        """Wait (bounded) until the winner of an Idempotency-Key race has saved its record."""
        deadline = time.monotonic() + timeout_s
        while await self.jobs.load(tenant, job_id) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        """Queued jobs never run; a running one leaves the engine at its next step."""
        record = await self.jobs.load(tenant, job_id)
        if record is None:
            raise NotFoundError(f"no job {job_id}", param="id")
        if record.status.terminal:
            return record
        await self.jobs.request_cancel(tenant, job_id)  # a runner elsewhere sees it at its next write
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=10)
        elif self.leases.shared:
            await self._until_final(tenant, job_id, CANCEL_WAIT_S)
        settled = await self.jobs.load(tenant, job_id)
        # Running nowhere, or canceled before its task ever started: settle it here, as its holder.
        if not settled.status.terminal and (task is None or task.done()):
            token = await self.leases.claim(job_id)
            if token is not None:
                settled.lease_token = token
                try:
                    await self._finish(settled, JobState.CANCELED)
                finally:
                    await self.leases.release(job_id, token)
        return await self.jobs.load(tenant, job_id)

    async def _until_final(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None:
        """The record once it is final (polled: its runner may be another process), or as it is."""
        deadline, delay = time.monotonic() + timeout_s, 0.05
        while True:
            record = await self.jobs.load(tenant, job_id)
            if record is None or record.status.terminal or time.monotonic() >= deadline:
                return record
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    async def wait(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None:
        """The record once the job is finished, or as it is after ``timeout_s``."""
        event = self._done.get(job_id)
        if event is not None:
            with contextlib.suppress(TimeoutError):  # not finished yet: the caller gets it as it is
                async with asyncio.timeout(timeout_s):
                    await event.wait()
        elif self.leases.shared:  # it may run in another coordinator
            return await self._until_final(tenant, job_id, timeout_s)
        return await self.jobs.load(tenant, job_id)

    async def resume(self) -> int:
        """Restart unfinished jobs found in the store: once per process when this is the only
        coordinator; on every call (each health check) when coordinators share the jobs, so a dead
        replica's jobs are claimed by another once their leases expire."""
        if self._resumed and not self.leases.shared:
            return 0
        pending = await self.jobs.pending()  # raises while storage is down: resume is tried again later
        self._resumed = True
        orphans = [(tenant, job_id) for tenant, job_id in pending if job_id not in self._tasks]
        for tenant, job_id in orphans:
            self._start(tenant, job_id)  # a job another replica holds ends at once: its claim fails
        if orphans and not self.leases.shared:
            logger.info("resumed %d unfinished job(s)", len(orphans))
        return len(orphans)

    async def watch_orphans(self) -> None:
        """With shared coordinators: rescan for orphaned jobs every half lease, so a dead replica's
        jobs are running again within about one lease time of its last renewal."""
        interval = getattr(self.leases, "ttl_ms", 15_000) / 2000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.resume()
            except Exception as error:  # storage or Redis away: the next round tries again
                logger.warning("could not scan for orphaned jobs: %s", error)

    async def latest_previews(self, tenant: str, job_id: str) -> list[dict[str, Any]]:
        """The newest preview of each image of a job this process runs (``serve.jobs.previews``)."""
        return self.previews.newest(tenant, job_id)

    async def drain(self) -> None:
        """Wait for every running job (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # ---- running a job ------------------------------------------------------------------------

    def _start(self, tenant: str, job_id: str) -> None:
        if job_id in self._tasks:
            return
        self._done.setdefault(job_id, asyncio.Event())
        task = asyncio.get_running_loop().create_task(self._run(tenant, job_id))
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, tenant: str, job_id: str) -> None:
        """Run a job to a final, saved state, holding its lease. If the store itself is down (the record
        cannot be read or written), wait for it and start over: the job's seed is fixed, so a rerun
        gives the same images."""
        token = None
        try:
            token = await self.leases.claim(job_id)
        except Exception as error:  # Redis unreachable: the next scan tries again
            logger.warning("job %s: could not claim its lease: %s", job_id, error)
        if token is None:
            self._sources.pop(job_id, None)
            event = self._done.pop(job_id, None)
            if event is not None:
                event.set()
            return
        self._tokens[job_id] = token
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(job_id, asyncio.current_task()))
        try:
            for _ in range(STORAGE_OUTAGE_RETRIES):
                try:
                    await self._run_once(tenant, job_id)
                    return
                except StorageUnavailableError as error:
                    logger.warning("job %s: storage unavailable (%s); waiting for it", job_id, error)
                    await self._storage_back(REPLICA_WAIT_S)
            logger.error("job %s: storage stayed down; the job stays pending and resumes on restart", job_id)
        finally:
            keeper.cancel()
            self.previews.finish(tenant, job_id)
            self._stale.discard(job_id)
            with contextlib.suppress(Exception):
                await self.leases.release(job_id, self._tokens.pop(job_id, token))
            self._sources.pop(job_id, None)
            event = self._done.pop(job_id, None)
            if event is not None:
                event.set()

    async def _keep_lease(self, job_id: str, run: asyncio.Task) -> None:
        """Renew the lease while the job runs; if it was lost, stop the job without a word written."""
        interval = getattr(self.leases, "ttl_ms", 15_000) / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.leases.renew(job_id, self._tokens[job_id]):
                    continue
            except Exception as error:  # Redis briefly away: the lease may still be ours; fencing decides
                logger.warning("job %s: could not renew its lease: %s", job_id, error)
                continue
            logger.warning("job %s: lease lost to another coordinator; stopping here", job_id)
            self._stale.add(job_id)
            run.cancel()
            return

    async def _save(self, record: JobRecord) -> None:
        """Every write of a running job is fenced with this process's token for it."""
        record.lease_token = self._tokens.get(record.id, record.lease_token)
        await self.jobs.save_fenced(record)

    async def _run_once(self, tenant: str, job_id: str) -> None:
        record = await self.jobs.load(tenant, job_id)
        try:
            if record is None or record.status.terminal:
                return
            if record.lease_token >= self._tokens[job_id]:  # the lease store forgot newer tokens
                raised = await self.leases.above(job_id, self._tokens[job_id], record.lease_token)
                if raised is None:
                    return
                self._tokens[job_id] = raised
            await self._save(record)  # takes the record: an older holder's next write now fails
            if record.cancel_requested:
                await self._finish(record, JobState.CANCELED)
                return
            await self._execute(record)
        except asyncio.CancelledError:
            if record is not None and job_id not in self._stale:
                await self._finish(record, JobState.CANCELED)
        except StaleLeaseError:
            logger.warning("job %s: a newer coordinator holds it; this one stops without writing", job_id)
        except StorageUnavailableError:
            raise
        except Exception:  # a bug must still leave the job in a final state
            logger.exception("job %s crashed", job_id)
            record.error = JobError(code="internal_error", message="internal error while running the job")
            await self._finish(record, JobState.FAILED)

    async def _execute(self, record: JobRecord) -> None:
        prepared = await self.service.restore(
            record.call, record.source_key, self._sources.pop(record.id, None)
        )
        last_save = 0.0

        async def on_progress(progress: Progress) -> None:
            nonlocal last_save
            await self._publish_previews(record, progress)
            record.steps_done, record.steps_total = progress.steps_done, progress.steps_total
            record.queue_position, record.eta_s = progress.queue_position, progress.eta_s
            # Queued until one of its images enters a batch (waiting in a replica's queue is queued).
            started = record.status is JobState.QUEUED and progress.queue_position is None
            if started:
                record.status, record.started_at = JobState.PROCESSING, datetime.now(UTC)
            if started or time.monotonic() - last_save >= PROGRESS_SAVE_INTERVAL_S:
                last_save = time.monotonic()
                await self._save(record)
                if record.cancel_requested:  # asked of another coordinator: leave the engine now
                    raise asyncio.CancelledError

        while True:
            record.status = JobState.QUEUED  # until the engine admits it (on_progress)
            record.run_attempts += 1
            await self._save(record)
            try:
                done = await self.service.execute(prepared, on_progress, preview_every=self.preview_every)
            except (InferenceError, ServingError) as error:
                if getattr(error, "transient", False) and record.run_attempts < MAX_RUNS:
                    logger.warning("job %s: %s; trying again once it recovers", record.id, error.code)
                    if isinstance(error, StorageUnavailableError):
                        await self._storage_back(REPLICA_WAIT_S)
                    else:
                        await self._model_ready(prepared.model.id, REPLICA_WAIT_S)
                    continue
                # The job object is client-facing (GET, SSE, webhooks): its error is the public one;
                # what really happened is logged here, once.
                logger.warning("job %s failed: %s: %s", record.id, error.code, error)
                record.error = JobError.of(error)
                await self._finish(record, JobState.FAILED)
                return
            record.images = [StoredOutput(key=i.key, width=i.width, height=i.height) for i in done.images]
            record.warnings = list(done.warnings)
            record.usage = done.usage_report(self.service.prices(record.tenant))
            record.steps_done = record.steps_total = max(record.steps_total, record.steps_done)
            await self._finish(record, JobState.COMPLETED, done)
            return

    async def _publish_previews(self, record: JobRecord, progress: Progress) -> None:
        """Best effort: a preview that cannot be encoded or published is skipped, never the job."""
        for preview in progress.previews:
            try:
                frame = await asyncio.to_thread(preview_frame, record.id, preview)
                await self.previews.publish(record.tenant, record.id, frame)
            except Exception as error:
                logger.warning("job %s: preview not published: %s", record.id, error)

    async def _storage_back(self, timeout_s: float) -> None:
        """Wait (bounded) until the object store answers again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                await self.service.store.check()
                return
            except ServingError as error:
                logger.debug("storage still unavailable: %s", error)

    async def _model_ready(self, model_id: str, timeout_s: float) -> None:
        """Wait (bounded) until the model has a replica that answers, e.g. after one died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                if (await self.service.backend.readiness()).get(model_id) is None:
                    return
            except Exception as error:
                logger.debug("readiness check failed: %s", error)

    async def _finish(self, record: JobRecord, state: JobState, done: CompletedCall | None = None) -> None:
        record.status = state
        record.completed_at = datetime.now(UTC)
        await self._save(record)
        try:  # free the tenant's slot and meter the job, whatever its end
            await self.service.release(record.call, done)
        except Exception as error:
            logger.warning("job %s: could not release its admission: %s", record.id, error)
        if record.webhook is not None and record.webhook.status == "pending":
            await self._notify(record)

    async def _notify(self, record: JobRecord) -> None:
        tenant = self.tenant_lookup(record.tenant)
        secret = webhook_secret_for(  # the tenant's own secret; a shared one only by explicit opt-in
            record.tenant,
            tenant.webhook_secret if tenant else None,
            self.webhook_secret,
            shared=self.webhook_shared_secret,
        )
        if secret is None:
            record.webhook.attempts.append({"error": NO_SECRET, "code": "no_secret"})
            record.webhook.status = "failed"
            await self._save(record)
            return
        payload = webhook_payload(await self.render(record), record.tenant)

        async def on_attempt(attempt) -> None:
            record.webhook.attempts.append(attempt.as_dict())
            await self._save(record)

        try:
            record.webhook.delivered = await deliver(
                record.webhook.url,
                payload,
                secret,
                self.fetch_policy,
                self.webhook_policy,
                on_attempt,
                event_id=record.id,
            )
        except (InferenceError, ServingError):
            logger.exception("webhook for job %s could not be delivered", record.id)
        record.webhook.status = "delivered" if record.webhook.delivered else "failed"
        if not record.webhook.delivered:
            logger.warning(
                "webhook for job %s failed after %d attempts; the job stays readable with GET",
                record.id,
                len(record.webhook.attempts),
            )
        await self._save(record)
