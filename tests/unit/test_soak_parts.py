"""The soak's plain parts (loadtests/soak*.py, schedule, growth, workers): no Ray, no network."""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import time

import httpx
import pytest
from PIL import Image

from loadtests.growth import all_growth, process_growth, slope, steady_window
from loadtests.schedule import arrivals, schedule_health
from loadtests.soak import SoakState, dispatch
from loadtests.soak_client import (
    SIDES,
    Draw,
    SoakClient,
    check_image,
    classify_exception,
    classify_response,
    draw,
)
from loadtests.soak_report import (
    EXIT_BEHIND,
    EXIT_ERRORS,
    EXIT_GROWTH,
    Outcome,
    build_summary,
    endpoint_stats,
    exit_code,
    render_markdown,
)
from loadtests.workers import MemorySample, process_label

# --- schedule -----------------------------------------------------------------------------------------


def test_arrivals_are_bounded_by_time_and_count():
    poisson = arrivals(rate=5, duration_s=60, max_requests=10_000, seed=1)
    assert poisson == sorted(poisson) and all(0 < t < 60 for t in poisson)
    assert 200 < len(poisson) < 400  # ~300 expected
    assert poisson == arrivals(rate=5, duration_s=60, max_requests=10_000, seed=1)  # reproducible
    assert len(arrivals(rate=5, duration_s=60, max_requests=7, seed=1)) == 7
    assert arrivals(rate=2, duration_s=2, max_requests=100, process="fixed") == [0.0, 0.5, 1.0, 1.5]
    assert arrivals(rate=2, duration_s=10, max_requests=3, process="fixed") == [0.0, 0.5, 1.0]
    assert arrivals(rate=0, duration_s=10, max_requests=3) == []
    with pytest.raises(ValueError):
        arrivals(rate=1, duration_s=1, max_requests=1, process="bursty")


def test_schedule_health_flags_unsent_requests_and_a_long_lag():
    kept_up = schedule_health(scheduled=4, lags_s=[0.0, 0.1, 0.0, 0.2], max_lag_s=10)
    assert (kept_up.unsent, kept_up.behind, kept_up.lag_max_s) == (0, False, 0.2)
    assert schedule_health(scheduled=5, lags_s=[0.0] * 4, max_lag_s=10).behind  # one was skipped


# --- memory growth ------------------------------------------------------------------------------------


def _samples(points: list[tuple[float, float]], key: str = "w [1]", pid: int = 1) -> list[MemorySample]:
    return [
        MemorySample(t=t, key=key, label=key.split(" ")[0], pid=pid, rss_mb=mb, uss_mb=None)
        for t, mb in points
    ]


def test_slope_is_least_squares():
    assert slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == pytest.approx(2.0)
    assert slope([(0, 0.0), (1, 2.0), (2, 0.0), (3, 2.0)]) == pytest.approx(0.4)
    assert slope([(5, 1.0)]) is None
    assert slope([(5, 1.0), (5, 2.0)]) is None
    assert steady_window(0, 600) == (300, 600)
    assert steady_window(10, 110, warmup_fraction=0.2) == (30, 110)


def test_warm_up_growth_is_excluded_from_the_slope():
    # +100 MB in the first half (warm-up), flat afterwards: growth reported, no slope, no flag.
    points = [(t, 100 + min(t, 300) / 3) for t in range(0, 601, 10)]
    growth = process_growth(_samples(points), steady_window(0, 600), threshold_mb_per_h=50)
    assert growth.growth_mb == pytest.approx(100)
    assert (growth.first_mb, growth.max_mb) == (100, pytest.approx(200))
    assert growth.slope_mb_per_h == pytest.approx(0, abs=1e-9)
    assert not growth.flagged
    assert growth.window_points == 31


def test_steady_growth_is_flagged_above_the_threshold_only():
    leaking = [(t, 100 + t / 36) for t in range(0, 601, 10)]  # 100 MB/h throughout
    growth = process_growth(_samples(leaking), steady_window(0, 600), threshold_mb_per_h=50)
    assert growth.slope_mb_per_h == pytest.approx(100)
    assert growth.flagged
    assert not process_growth(_samples(leaking), steady_window(0, 600), threshold_mb_per_h=150).flagged
    # Over a 30 s window the same rate is a rise under the noise floor: not flagged.
    short = process_growth(_samples(leaking[:7]), steady_window(0, 60), threshold_mb_per_h=50, min_rise_mb=2)
    assert short.slope_mb_per_h == pytest.approx(100) and not short.flagged
    # Too few points in the window: no slope at all.
    sparse = process_growth(_samples([(0, 1.0), (50, 2.0), (100, 9.0)]), (60, 100), threshold_mb_per_h=1)
    assert sparse.slope_mb_per_h is None and not sparse.flagged


def test_all_growth_keeps_each_process_apart_largest_first():
    samples = _samples([(0, 10.0), (10, 11.0)], "a [1]", 1) + _samples([(0, 50.0), (10, 50.0)], "b [2]", 2)
    rows = all_growth(samples, 0, 10, threshold_mb_per_h=50)
    assert [(g.key, g.samples, g.growth_mb) for g in rows] == [("b [2]", 2, 0.0), ("a [1]", 2, 1.0)]


def test_process_labels():
    title = ["ray::ServeReplica:img2img:Ingress" + " " * 40]
    assert process_label(title, "python") == "ServeReplica:img2img:Ingress"
    busy = ["ray::ServeReplica:img2img:model-tiny-sd.initialize_and_get_metadata"]
    assert process_label(busy, "x") == "ServeReplica:img2img:model-tiny-sd"
    assert (
        process_label(["ray::ServeReplica:img2img:model-sd-1.5"], "x") == "ServeReplica:img2img:model-sd-1.5"
    )
    assert process_label(["ray::ServeController"], "x") == "ServeController"
    assert (
        process_label(["/venv/bin/python", "-u", "/venv/ray/_private/monitor.py", "--x"], "python")
        == "monitor.py"
    )
    assert process_label(["/venv/ray/core/src/ray/raylet/raylet", "--flag"], "raylet") == "raylet"
    assert process_label([], "zombie") == "zombie"


# --- requests -----------------------------------------------------------------------------------------


def test_draws_stay_in_range_and_rest_keeps_the_source_size():
    rng = random.Random(3)
    draws = [draw(rng) for _ in range(400)]
    assert {d.endpoint for d in draws} == {"rest_sync", "async", "node", "openai"}
    assert all(4 <= d.steps <= 12 and 0.3 <= d.strength <= 1 and 1 <= d.num_images <= 2 for d in draws)
    assert all(d.source_side in SIDES and d.width in SIDES and d.height in SIDES for d in draws)
    assert all(
        (d.width, d.height) == (d.source_side,) * 2 for d in draws if d.endpoint in ("rest_sync", "async")
    )
    assert {d.endpoint for d in (draw(rng, ("node",)) for _ in range(20))} == {"node"}


def test_error_classification():
    assert (
        classify_response(503, {"error": {"code": "overloaded", "message": "busy"}}) == "http_503:overloaded"
    )
    openai_shape = {"error": {"message": "m", "type": "invalid_request_error", "param": "n", "code": None}}
    assert classify_response(400, openai_shape) == "http_400:invalid_request_error"
    assert classify_response(502, None) == "http_502"
    assert classify_response(500, {"detail": "x"}) == "http_500"
    assert classify_exception(httpx.ReadTimeout("slow")) == "transport:ReadTimeout"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_check_image():
    assert check_image(_png(64, 96), 64, 96) is None
    assert check_image(_png(64, 64), 64, 96) == "download:wrong_size"
    assert check_image(b"<html>", 64, 64) == "download:not_an_image"


def _draw(endpoint: str, num_images: int = 2) -> Draw:
    return Draw(endpoint, "p", 0.5, 4, 5.0, num_images, 64, 64, 64, 1)


def _client(handler, download_fraction: float = 1.0) -> tuple[SoakClient, list[httpx.Request]]:
    """A SoakClient over an in-memory transport: ``handler(request) -> Response``; requests recorded."""
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    transport = httpx.MockTransport(record)
    api = httpx.AsyncClient(base_url="http://svc", transport=transport, headers={"Authorization": "Bearer k"})
    downloads = httpx.AsyncClient(transport=transport)
    sources = {side: ["data:image/png;base64,iVBORw0KGgo="] for side in SIDES}
    client = SoakClient(api, downloads, sources, poll_interval_s=0.01, download_fraction=download_fraction)
    return client, seen


def test_async_job_is_polled_to_completion_and_an_image_downloaded():
    job = {"id": "j1", "status": "queued", "images": []}
    polls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            assert request.headers["prefer"] == "respond-async"
            return httpx.Response(202, json=job, headers={"Location": "/v1/image-to-image/j1"})
        if request.url.path == "/v1/image-to-image/j1":
            polls.append(1)
            done = len(polls) >= 2
            images = [{"url": f"http://s3/o{i}.png"} for i in range(2)] if done else []
            return httpx.Response(
                200, json={**job, "status": "completed" if done else "processing", "images": images}
            )
        assert "authorization" not in request.headers  # downloads go without the API key
        return httpx.Response(200, content=_png(64, 64))

    client, seen = _client(handler)
    assert asyncio.run(client.run(_draw("async"))) == (None, True)
    assert len(polls) == 2 and seen[-1].url == "http://s3/o0.png"


@pytest.mark.parametrize(
    ("endpoint", "response", "expected"),
    [
        (
            "rest_sync",
            httpx.Response(200, json={"status": "failed", "error": {"code": "timeout"}}),
            "job_failed:timeout",
        ),
        (
            "rest_sync",
            httpx.Response(200, json={"status": "completed", "images": [{"url": "http://a"}]}),
            "bad_body:wrong_image_count",
        ),
        (
            "node",
            httpx.Response(200, json={"images": ["not-a-url", "http://b"]}),
            "bad_body:image_without_url",
        ),
        ("node", httpx.Response(429, json={"error": {"code": "rate_limited"}}), "http_429:rate_limited"),
        ("openai", httpx.Response(200, text="oops"), "bad_body:not_a_json_object"),
        ("async", httpx.Response(200, json={"id": "j"}), "http_200"),  # a 202 was due
    ],
)
def test_wrong_answers_are_classified(endpoint, response, expected):
    client, _ = _client(lambda request: response)
    assert asyncio.run(client.run(_draw(endpoint))) == (expected, False)


def test_a_bad_download_is_an_error():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "svc":
            return httpx.Response(200, json={"data": [{"url": "http://s3/a"}, {"url": "http://s3/b"}]})
        return httpx.Response(403, text="expired")

    client, _ = _client(handler)
    assert asyncio.run(client.run(_draw("openai"))) == ("download:http_403", True)


# --- dispatch (open loop, bounded) ---------------------------------------------------------------------


class _SlowClient:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self, d: Draw) -> tuple[str | None, bool]:
        await asyncio.sleep(self.seconds)
        return None, False


def _dispatch(schedule: list[float], client, **options) -> SoakState:
    args = argparse.Namespace(
        **{
            "concurrency": 1,
            "seed": 0,
            "endpoints": ["node"],
            "max_lag": 0.1,
            "drain_timeout": 1.0,
            **options,
        }
    )
    state = SoakState(scheduled=len(schedule))

    async def go() -> None:
        state.t0 = time.monotonic()
        await dispatch(state, client, schedule, args)

    asyncio.run(go())
    return state


def test_dispatch_skips_a_request_that_gets_no_slot_within_the_max_lag():
    # One slot, busy for 0.3 s: the requests due at 0.05 and 0.1 would wait > 0.1 s, so they are
    # skipped; the one due at 0.5 finds the slot free again.
    started = time.monotonic()
    state = _dispatch([0.0, 0.05, 0.1, 0.5], _SlowClient(0.3))
    health = schedule_health(state.scheduled, state.lags, max_lag_s=0.1)
    assert (health.sent, health.unsent, health.behind) == (2, 2, True)
    assert [o.due_s for o in state.outcomes] == [0.0, 0.5] and all(o.error is None for o in state.outcomes)
    assert health.lag_max_s < 0.1
    assert time.monotonic() - started < 1.5  # 0.5 s of arrivals + 0.3 s for the last answer


def test_dispatch_sends_everything_on_time_when_slots_are_free():
    state = _dispatch([0.0, 0.05, 0.1], _SlowClient(0.01), concurrency=2)
    assert len(state.outcomes) == 3 and not schedule_health(3, state.lags, 0.1).behind


def test_dispatch_cuts_off_what_outlives_the_drain():
    state = _dispatch([0.0], _SlowClient(5.0), drain_timeout=0.1)
    assert [o.error for o in state.outcomes] == ["unfinished:cut_off_after_drain"]
    assert state.outcomes[0].latency_s is None


# --- report -------------------------------------------------------------------------------------------


def _outcomes() -> list[Outcome]:
    return [
        Outcome("node", 0.0, 0.0, 1.0, None, True),
        Outcome("node", 1.0, 1.0, 3.0, None),
        Outcome("node", 2.0, 2.0, 2.0, "http_503:overloaded"),
        Outcome("openai", 3.0, 3.0, 0.5, None),
    ]


def test_endpoint_stats_and_exit_code():
    stats = endpoint_stats(_outcomes(), load_s=4.0)
    assert list(stats) == ["node", "openai", "all"]
    assert stats["node"] | {"latency_p50_s": None} == {
        "sent": 3,
        "ok": 2,
        "errors": 1,
        "errors_by_code": {"http_503:overloaded": 1},
        "downloads_checked": 1,
        "rate_per_s": 0.75,
        "latency_p50_s": None,
        "latency_p95_s": pytest.approx(2.9),
        "latency_p99_s": pytest.approx(2.98),
        "latency_max_s": 3.0,
    }
    assert stats["node"]["latency_p50_s"] == 2.0  # errors' latencies are left out
    assert stats["all"]["sent"] == 4
    kept_up, behind = schedule_health(4, [0.0] * 4, 10), schedule_health(5, [0.0] * 4, 10)
    flagged = all_growth(_samples([(t, t) for t in range(0, 100, 10)]), 0, 90, threshold_mb_per_h=1)
    assert exit_code(0, kept_up, flagged, fail_on_growth=False) == 0
    assert exit_code(1, behind, flagged, fail_on_growth=True) == EXIT_ERRORS | EXIT_BEHIND | EXIT_GROWTH


def test_markdown_report():
    health = schedule_health(4, [0.0, 0.1, 0.0, 0.0], 10)
    growth = all_growth(
        _samples([(t, 100 + t) for t in range(0, 100, 10)], "ServeController [7]", 7),
        0,
        90,
        threshold_mb_per_h=50,
    )
    config = {
        "target": "http://127.0.0.1:1",
        "storage": "s3",
        "arrivals": "poisson",
        "rate": 1.0,
        "duration": 4,
        "max_requests": 16,
        "concurrency": 8,
        "endpoints": ["node", "openai"],
        "steps": "4-12",
        "sides": "64/96/128",
        "window_start_s": 45.0,
        "warmup_fraction": 0.5,
        "growth_threshold_mb_h": 50,
        "min_rise_mb": 2,
        "metrics_url": "",
        "scrape_interval": 10,
    }
    summary = build_summary(
        config=config,
        outcomes=_outcomes(),
        load_s=4.0,
        wall_s=6.0,
        health=health,
        growth=growth,
        memory_note="sampled",
        snapshots=[],
        exit_status=exit_code(1, health, growth, fail_on_growth=False),
    )
    text = render_markdown(summary, [], ["memory.png"])
    assert "**FAIL (exit 1: 1 failed requests): 4 requests in 4 s (1.00 req/s), 3 ok, 1 errors" in text
    assert "| node | http_503:overloaded | 1 |" in text
    assert "| node | 3 | 2 | 1 | 1 | 0.75 | 2.00 |" in text
    assert "**kept up**" in text
    assert "| ServeController | 7 | 0–90 | 10 | 100.0 | 190.0 | 190.0 | +90.0 | +3600.0 | - | ⚠ |" in text
    assert "No `--metrics-url` given" in text and text.endswith("![memory.png](memory.png)\n")
    assert summary["memory"]["processes"][0]["growth_mb"] == 90.0
