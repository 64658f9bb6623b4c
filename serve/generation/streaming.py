"""A call run while its previews stream out: what streaming APIs build their events from.

The synchronous path (``GenerationService.run``) returns once the images are stored. A streaming
API (OpenAI's ``stream=true`` edits) must also hand out previews while the engine works, and must
stop the work when its client goes away, so this runs ``execute`` as a task and yields from it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from inference.types import Preview, Progress
from serve.generation.calls import CompletedCall, PreparedCall
from serve.generation.service import GenerationService


def preview_interval(steps: int, strength: float, previews: int) -> int:
    """The k of "a preview every k steps" that spreads ``previews`` evenly over the denoising steps an
    image will run (``steps × strength`` of them in img2img; 0 when no previews are wanted)."""
    if previews <= 0:
        return 0
    denoising = max(1, int(steps * min(1.0, strength)))
    return max(1, denoising // (previews + 1))


async def stream_call(
    service: GenerationService, prepared: PreparedCall, preview_every: int
) -> AsyncIterator[Preview | CompletedCall]:
    """Execute ``prepared``: its previews as the engine makes them, then the completed call.

    A failure is raised from the iterator after the previews that came before it. Closing the
    iterator early (the client disconnected) cancels the generation, which leaves the engine at its
    next step, like a synchronous call whose client leaves. The call's admission is released once,
    however it ends."""
    previews: asyncio.Queue[Preview] = asyncio.Queue()

    async def on_progress(progress: Progress) -> None:
        for preview in progress.previews:
            previews.put_nowait(preview)

    work = asyncio.ensure_future(service.execute(prepared, on_progress, preview_every=preview_every))
    waiter: asyncio.Future | None = None
    done: CompletedCall | None = None
    try:
        while not work.done():
            waiter = asyncio.ensure_future(previews.get())
            await asyncio.wait({waiter, work}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                yield waiter.result()
        while not previews.empty():
            yield previews.get_nowait()
        done = work.result()
        yield done
    finally:
        if waiter is not None:
            waiter.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        await service.release(prepared.call, done)
