"""How one call runs: now, or as a durable job (asynchronous, idempotent, or both).

This is the branching the REST route used to hold. Routes only translate their wire schema to a
``GenerationCall`` and a ``Durability``, and the outcome back; the rules live here once:

* a plain call runs in this process and leaves a completed record, so GET finds it too;
* a durable call is prepared here (every check that can be the caller's fault, its source stored)
  and handed to the job coordinator, which persists it before anything runs;
* an Idempotency-Key is recognised before the source is fetched, decoded, stored or charged; a
  concurrent request that loses the key undoes its own admission and stored source;
* a synchronous idempotent call waits for the coordinator's outcome and fails as its job failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from inference.images import SourceImage
from serve.errors import JobFailedError
from serve.generation.calls import CompletedCall, GenerationCall
from serve.generation.service import GenerationService
from serve.jobs.records import (
    JobError,
    JobRecord,
    JobState,
    JobStore,
    RequestEcho,
    completed_record,
    new_record,
)

SYNC_WAIT_S = 300.0  # an idempotent synchronous call waits this long, then is answered as accepted


class Coordinator(Protocol):
    """The owner of durable jobs: the coordinator deployment's handle, or a ``JobRunner`` in-process."""

    async def accept(
        self, record: JobRecord, idempotency: tuple[str, str] | None = None, source: SourceImage | None = None
    ) -> str: ...

    async def cancel(self, tenant: str, job_id: str) -> JobRecord: ...

    async def wait(self, tenant: str, job_id: str, timeout_s: float) -> JobRecord | None: ...


@dataclass(frozen=True)
class Durability:
    """How the caller wants the call run: ``respond_async`` answers once it is accepted;
    ``idempotency`` is (Idempotency-Key, body fingerprint); ``webhook_url`` is told the outcome."""

    respond_async: bool = False
    idempotency: tuple[str, str] | None = None
    webhook_url: str | None = None

    @property
    def durable(self) -> bool:
        return self.respond_async or self.idempotency is not None


@dataclass(frozen=True)
class Submitted:
    """The call's record as it stands, and its result when it ran in this process."""

    record: JobRecord
    done: CompletedCall | None = None

    @property
    def finished(self) -> bool:
        return self.record.status is JobState.COMPLETED


@dataclass
class Submissions:
    service: GenerationService
    coordinator: Coordinator
    records: JobStore

    async def submit(self, call: GenerationCall, echo: RequestEcho, how: Durability) -> Submitted:
        if not how.durable:
            done = await self.service.run(call)
            usage = done.usage_report(self.service.prices(call.tenant))
            record = completed_record(done, echo.model_copy(update=_ran_with(done)), usage)
            await self.records.save(record)
            return Submitted(record, done)
        job_id = await self._accept(call, echo, how)
        if how.respond_async:
            return Submitted(await self.records.load(call.tenant, job_id))
        record = await self.coordinator.wait(call.tenant, job_id, SYNC_WAIT_S)
        if record.status is JobState.FAILED:
            raise JobFailedError.of(
                record.error or JobError(code="generation_failed", message="generation failed")
            )
        return Submitted(record)

    async def _accept(self, call: GenerationCall, echo: RequestEcho, how: Durability) -> str:
        """The job id of this call: a new accepted job, or the one its Idempotency-Key is bound to."""
        if how.idempotency is not None:
            replayed = await self.records.replayed_job(call.tenant, *how.idempotency)
            if replayed is not None:
                return replayed
        prepared = await self.service.store_source(await self.service.prepare(call))
        record = new_record(prepared, echo.model_copy(update=_ran_with(prepared)), how.webhook_url)
        try:
            job_id = await self.coordinator.accept(record, how.idempotency, prepared.source)  # decoded once
        except BaseException:
            await self.service.release(prepared.call, None)
            raise
        if job_id != record.id:  # a concurrent request won the key: undo this one's admission and source
            await self.service.release(prepared.call, None)
            await self.service.discard_source(prepared)
        return job_id


def _ran_with(prepared) -> dict[str, float]:
    """The values a call ran with where the caller left the choice to the model (guidance)."""
    return {"guidance_scale": prepared.call.params.guidance_scale}
