"""The load-test runner's plain parts: key parsing, shapes, metric reduction (no locust, no network)."""

from __future__ import annotations

import math

from loadtests._shared import constant_shape, parse_api_keys, parse_steps, spike_shape, step_shape
from loadtests.metrics import (
    Snapshot,
    batch_size,
    bucket_counts,
    normalize_metrics_url,
    parse_prometheus,
    reduce,
)


def test_parse_api_keys_names_weights_and_equals_in_keys():
    assert parse_api_keys("acme=sk-1:3, sk-2 ,,b64key==") == [
        ("acme", "sk-1", 3.0),
        ("tenant2", "sk-2", 1.0),
        ("tenant3", "b64key==", 1.0),
    ]
    assert parse_steps("2-4") == (2, 4)
    assert parse_steps("3") == (3, 3)


def test_shapes_are_bounded():
    assert constant_shape(0, 4, 10) == (4, 4.0)
    assert constant_shape(10, 4, 10) is None
    assert [step_shape(t, 8, 40)[0] for t in (0, 10, 20, 39)] == [2, 4, 6, 8]
    assert step_shape(40, 8, 40) is None
    assert [spike_shape(t, 8, 100)[0] for t in (0, 39, 40, 59, 60)] == [2, 2, 8, 8, 2]
    assert spike_shape(100, 8, 100) is None


def test_metrics_reduction_and_batch_figures():
    text = """# HELP x
ray_img2img_batched_samples_total{deployment="model-a",replica="r1"} 30.0
ray_img2img_batched_samples_total{deployment="model-a",replica="r2"} 10.0
ray_img2img_unet_calls_total{deployment="model-a",replica="r1"} 20.0
ray_img2img_batch_samples_bucket{deployment="model-a",le="1.0",replica="r1"} 5.0
ray_img2img_batch_samples_bucket{deployment="model-a",le="2.0",replica="r1"} 15.0
ray_img2img_batch_samples_bucket{deployment="model-a",le="4.0",replica="r1"} 20.0
ray_img2img_batch_samples_bucket{deployment="model-a",le="+Inf",replica="r1"} 20.0
ray_serve_deployment_replica_healthy{deployment="model-a",replica="r1"} 1.0
ray_serve_deployment_replica_healthy{deployment="model-a",replica="r2"} 0.0
ray_serve_replica_processing_queries{deployment="Ingress",replica="i1"} 2.0
"""
    snap = reduce(parse_prometheus(text), t=1.0)
    assert (snap.batched_samples, snap.unet_calls) == (40.0, 20.0)
    assert snap.replicas == {"Ingress": 1, "model-a": 1}
    assert snap.batch_buckets[math.inf] == 20.0
    assert batch_size(Snapshot(t=0.0), snap) == 2.0
    assert bucket_counts(None, snap) == [("1", 5.0), ("2", 10.0), ("3-4", 5.0), (">4", 0.0)]
    assert normalize_metrics_url("127.0.0.1:8080") == "http://127.0.0.1:8080/metrics"
    assert normalize_metrics_url("http://h:1/m") == "http://h:1/m"
