"""``job_events``: a job's server-sent events, read to the end, for tests of the live stack."""

from __future__ import annotations

import json

import httpx


def job_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """(event name, data) of every event of ``GET /v1/image-to-image/{id}/events`` until it closes."""
    events = []
    with client.stream("GET", f"/v1/image-to-image/{job_id}/events") as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: "):
                events.append((line[7:], json.loads(next(lines)[6:])))
    return events


def preview_pictures(events: list[tuple[str, dict]]) -> list[bytes]:
    """The JPEG bytes of every ``preview`` event."""
    import base64

    return [base64.b64decode(data["image"].split(",", 1)[1]) for name, data in events if name == "preview"]
