"""Engine step-thread stall for a 1 MB prompt: before and after (security round 2, finding 4).

Before: the node API took prompts of any length, the engine admitted the request, and the step that
admitted it tokenised and encoded the whole text on the engine's step thread, so every request
batched with it waited. After: every API refuses a prompt over 2,000 characters (and lone surrogates,
control characters) at the edge with a 400, and ``StepBatchingEngine.submit`` refuses it again.

Measured on the tiny random-weight SD and SDXL pipelines (``inference.tiny``; their tokenizers are
the same slow ``CLIPTokenizer`` class the real models load, with a tiny vocabulary):

* the admitting ``engine.step()``, one ordinary request alone, then the same with a 1 MB-prompt
  request admitted beside it (queued the way ``submit`` queued it before the check);
* after: the time ``submit`` takes to refuse it, and the time the node API takes to answer 400.

    PYTHONPATH=. .venv/bin/python benchmarks/prompt_stall.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from PIL import Image

from inference.engine import StepBatchingEngine
from inference.engine_config import EngineConfig
from inference.errors import InvalidInputError
from inference.models import Family
from inference.tiny import build_tiny_pipeline
from inference.types import GenerationRequest

ONE_MB = "a red fox in the snow, " * (1024 * 1024 // 23)


def request(request_id: str, prompt: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model="tiny",
        prompt=prompt,
        image=Image.new("RGB", (64, 64), (90, 120, 200)),
        seed=1,
        strength=0.8,
        steps=4,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
    )


def admitting_step(engine: StepBatchingEngine, *requests: GenerationRequest) -> float:
    """Seconds of the step that admits ``requests`` (queued as ``submit`` did before the text check)."""
    for item in requests:
        engine._inbox.put(("submit", item, time.monotonic()))
    started = time.perf_counter()
    engine.step()
    elapsed = time.perf_counter() - started
    while engine.has_work:
        engine.step()
    return elapsed


def main() -> int:
    print(f"prompt: {len(ONE_MB):,} characters")
    for family in (Family.SD, Family.SDXL):
        engine = StepBatchingEngine(build_tiny_pipeline(family), family, EngineConfig())
        admitting_step(engine, request("warm", "warm up"))
        alone = min(admitting_step(engine, request(f"n{i}", "a red fox")) for i in range(3))
        big = admitting_step(engine, request("n9", "a red fox"), request("big", ONE_MB))
        print(
            f"{family.value}: admitting step, ordinary request alone {alone * 1e3:.0f} ms; "
            f"with a 1 MB prompt beside it (before) {big:.2f} s"
        )
        started = time.perf_counter()
        try:
            engine.submit(request("big2", ONE_MB))
        except InvalidInputError as error:
            refused_us = (time.perf_counter() - started) * 1e6
            print(f"  after: submit refuses it ({error.code}, {error.param}) in {refused_us:.0f} us")

    from fastapi.testclient import TestClient

    from tests.unit.api_fakes import AUTH, build_app, data_url

    with tempfile.TemporaryDirectory() as folder, TestClient(build_app(Path(folder))) as client:
        body = {"source_image": data_url(64, 48), "prompt": ONE_MB, "negative_prompt": ""}
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            response = client.post("/v1/nodes/image_to_image", json=body, headers=AUTH)
            timings.append(time.perf_counter() - started)
        error = response.json()["error"]
        print(
            f"after, over HTTP (node API, in-process): {response.status_code} {error['code']} "
            f"param={error['param']} in {min(timings) * 1e3:.0f} ms (parsing the 1 MB JSON body included); "
            f"message: {error['message']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
