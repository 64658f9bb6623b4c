"""Previews of running jobs on their ``/events`` stream (in-process JobRunner, fake backend).

Contract: while a job runs, its event stream carries ``preview`` events, the newest picture of each
image; previews reach nobody through storage (the job record never holds one) and are forgotten when
the job ends; jobs ask the engine for them only when ``previews.job_every_steps`` is on.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

from PIL import Image

from serve.jobs.previews import LocalPreviewBoard, PreviewFollowers
from tests.unit.api_fakes import AUTH, TENANT, data_url

URL = "/v1/image-to-image"


def _submit(client, **fields) -> dict:
    body = {"image": data_url(64, 48), "prompt": "a lighthouse", "steps": 12, "strength": 1.0, **fields}
    response = client.post(URL, json=body, headers={**AUTH, "Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    return response.json()


async def _event() -> asyncio.Event:
    return asyncio.Event()  # made on the app's loop


def test_a_running_jobs_events_carry_the_newest_preview_of_each_image(client, app, backend):
    app.state.jobs.preview_every = 4
    backend.gate = client.portal.call(_event)  # the job runs until the test releases it
    job = _submit(client, num_images=2)
    names, previews = [], []
    with client.stream("GET", f"{URL}/{job['id']}/events", headers=AUTH) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: "):
                names.append(line[7:])
                data = json.loads(next(lines)[6:])
                if names[-1] == "preview":
                    previews.append(data)
                if sum(p["step"] == 8 for p in previews) == 2:
                    client.portal.call(backend.gate.set)  # both images at their newest: let it finish
    assert backend.last.preview_every == 4
    assert names[-1] == "completed" and "processing" in names
    for index in (0, 1):  # a poll may fall between the engine's step-4 and step-8 reports
        steps = [p["step"] for p in previews if p["image_index"] == index]
        assert steps in ([8], [4, 8]), steps  # each frame once, in order, ending at the newest
    for frame in previews:
        assert frame["id"] == job["id"] and frame["steps"] == 12
        assert frame["image"].startswith("data:image/jpeg;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(frame["image"].split(",", 1)[1])))
        assert (
            (picture.format, picture.size) == ("JPEG", (frame["width"], frame["height"])) == ("JPEG", (8, 6))
        )
    assert client.portal.call(app.state.jobs.latest_previews, TENANT, job["id"]) == []  # forgotten
    stored = client.portal.call(app.state.job_store.load, TENANT, job["id"])
    assert "data:image" not in stored.model_dump_json()  # never stored


def test_jobs_ask_for_no_previews_when_they_are_off(client, app, backend):
    app.state.jobs.preview_every = 0
    job = _submit(client)
    client.portal.call(app.state.jobs.drain)
    assert backend.last.preview_every == 0
    assert client.get(f"{URL}/{job['id']}", headers=AUTH).json()["status"] == "completed"


def test_a_follower_hands_out_each_frame_once():
    class Coordinator:
        board = LocalPreviewBoard()

        async def latest_previews(self, tenant, job_id):
            return self.board.newest(tenant, job_id)

    async def scenario():
        coordinator = Coordinator()
        follower = PreviewFollowers(coordinator).follow("t", "job")
        await coordinator.board.publish("t", "job", {"image_index": 0, "step": 2})
        first = await follower.take()
        again = await follower.take()
        await coordinator.board.publish("t", "job", {"image_index": 0, "step": 4})
        await coordinator.board.publish("t", "other", {"image_index": 0, "step": 4})
        return first, again, await follower.take()

    first, again, newer = asyncio.run(scenario())
    assert (first, again, newer) == ([{"image_index": 0, "step": 2}], [], [{"image_index": 0, "step": 4}])
