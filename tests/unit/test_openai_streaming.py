"""OpenAI streaming edits (``stream=true``, ``partial_images``) through the app with a fake backend.

The unchanged ``openai`` client iterates the events (its HTTP client is the in-process test client);
the raw stream is checked against OpenAI's event shapes; failures before the stream are JSON errors,
failures during it an ``error`` event the client raises; a client that disconnects cancels the work.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import openai
import pytest
from PIL import Image

from inference.errors import GenerationError
from serve.generation.streaming import preview_interval
from tests.support.asgi import body_then_disconnect, http_scope
from tests.unit.api_fakes import API_KEY, AUTH, image_bytes, seed_colour

URL = "/v1/images/edits"
SOURCE = image_bytes(64, 48)


def _client(test_client) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=API_KEY, base_url="http://testserver/v1", http_client=test_client, max_retries=0
    )


def _events(response) -> list[tuple[str, dict]]:
    """(event name, data) of every server-sent event of a whole response."""
    events = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def _post(client, **fields):
    data = {"prompt": "a red fox", "stream": "true", **{k: str(v) for k, v in fields.items()}}
    return client.post(URL, data=data, files=[("image", ("s.png", SOURCE, "image/png"))], headers=AUTH)


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_openai_client_iterates_partial_images_then_the_image(client, backend):
    stream = _client(client).images.edit(
        image=("s.png", SOURCE, "image/png"), prompt="a red fox", stream=True, partial_images=2
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert backend.last.preview_every == preview_interval(30, 0.7, 2) == 7  # 21 steps, 3 even slices
    for event in events[:2]:
        preview = _image(event.b64_json)
        assert (preview.format, preview.size, event.size) == ("PNG", (64, 48), "64x48")  # the output size
    done = events[-1]
    assert _image(done.b64_json).getpixel((0, 0)) == seed_colour(backend.last.seed)
    assert done.usage.images == 1 and done.usage.steps == 30


def test_the_raw_events_have_openai_shapes(client):
    response = _post(client, partial_images=3, n=2, output_format="webp")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response)
    assert [name for name, _ in events] == ["image_edit.partial_image"] * 3 + ["image_edit.completed"] * 2
    for name, body in events:
        assert body["type"] == name
        assert body["output_format"] == "webp" and body["size"] == "64x48"
        assert isinstance(body["created_at"], int) and body["quality"] and body["background"]
        assert _image(body["b64_json"]).format == "WEBP"
    assert [body["partial_image_index"] for _, body in events[:3]] == [0, 1, 2]
    assert {"images", "steps", "model_seconds"} <= set(events[-1][1]["usage"])


def test_no_partial_images_is_one_event_per_image(client, backend):
    events = _events(_post(client, partial_images=0))
    assert [name for name, _ in events] == ["image_edit.completed"]
    assert backend.last.preview_every == 0  # nobody pays for previews nobody asked for


@pytest.mark.parametrize(
    ("fields", "param"), [({"partial_images": 4}, "partial_images"), ({"model": "nope"}, "model")]
)
def test_bad_input_is_a_json_error_before_any_stream(client, backend, fields, param):
    response = _post(client, **fields)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == param
    assert not backend.calls


def test_a_failure_mid_stream_is_an_error_event_the_client_raises(client, backend):
    backend.error = GenerationError("the UNet broke", details="secret internals")
    stream = _client(client).images.edit(
        image=("s.png", SOURCE, "image/png"), prompt="a red fox", stream=True, partial_images=1
    )
    with pytest.raises(openai.APIError) as raised:
        list(stream)
    assert raised.value.body["code"] == "generation_failed"
    assert "secret internals" not in str(raised.value.body)  # a server fault keeps its text private


async def _streamed_then_gone(app, body: bytes, content_type: str):
    """Post ``body`` over raw ASGI, read until the first event, then disconnect; the app's task."""
    first_event = asyncio.Event()
    receive, gone = body_then_disconnect(body)

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            first_event.set()

    scope = http_scope("POST", URL, {"content-type": content_type, **AUTH})
    task = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(first_event.wait(), 10)
    gone.set()
    await asyncio.wait_for(task, 10)


def test_a_client_that_disconnects_cancels_the_generation(app, backend):
    import httpx

    backend.gate = asyncio.Event()  # the generation runs until canceled
    request = httpx.Request(
        "POST",
        "http://testserver" + URL,
        data={"prompt": "a red fox", "stream": "true", "partial_images": "1"},
        files=[("image", ("s.png", SOURCE, "image/png"))],
    )
    body = request.read()

    async def scenario():
        await _streamed_then_gone(app, body, request.headers["content-type"])

    asyncio.run(scenario())
    assert backend.cancelled == [backend.last.request_id]


def test_preview_interval_spreads_previews_over_the_denoising_steps():
    assert preview_interval(30, 0.7, 0) == 0
    assert preview_interval(30, 0.7, 2) == 7  # 21 steps: previews after 7 and 14
    assert preview_interval(4, 0.5, 3) == 1  # fewer steps than slices: every step, at most 3 sent
    assert preview_interval(50, 1.0, 1) == 25
