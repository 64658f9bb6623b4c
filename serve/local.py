"""``make run``: Ray, the Serve application and the embedded local storage on http://127.0.0.1:8000.

Builds the tiny smoke models offline if missing, takes the development API key from
``IMG2IMG_DEV_API_KEY`` (or makes one and prints it), starts a single-node Ray on loopback, deploys
``cluster/serve_config.local.yaml`` and prints a curl example that returns downloadable image URLs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import secrets
import signal
import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path("cluster/serve_config.local.yaml")


def load_serve_config(path: Path) -> dict:
    with path.open() as handle:
        return yaml.safe_load(handle)


def _sample_request(out: Path) -> Path:
    """A small request body with an inline PNG, for the printed curl example."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (90, 140, 200)).save(buffer, format="PNG")
    body = {
        "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(),
        "prompt": "a lighthouse at dusk, oil painting",
        "strength": 0.6,
        "steps": 20,
        "num_images": 2,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sample-request.json"
    path.write_text(json.dumps(body))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    parser.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus exporter port")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    key = os.environ.setdefault("IMG2IMG_DEV_API_KEY", "dev-" + secrets.token_urlsafe(18))
    os.environ.setdefault("IMG2IMG_URL_SIGNING_KEY", secrets.token_urlsafe(32))
    os.environ.setdefault("IMG2IMG_WEBHOOK_SECRET", secrets.token_urlsafe(32))

    from inference.tiny import ensure_tiny_models

    ensure_tiny_models(args.models_dir)

    import ray
    from ray import serve

    from serve.app import build_app

    config = load_serve_config(args.config)
    http = config.get("http_options", {})
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _metrics_export_port=args.metrics_port,
    )
    serve.start(http_options=http)
    application = config["applications"][0]
    serve.run(
        build_app(application["args"]), name=application["name"], route_prefix=application["route_prefix"]
    )
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    sample = _sample_request(Path("out"))
    print(
        f"\nimg2img service ready on {base}\n"
        f"  API key (tenant 'dev'): {key}\n"
        f"  metrics: http://127.0.0.1:{args.metrics_port}/metrics (see cluster/prometheus.local.yml)\n\n"
        f"Try it:\n  curl -s -X POST {base}/v1/image-to-image \\\n"
        f"    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n"
        f"    -d @{sample}\n\nCtrl-C stops the service.",
        flush=True,
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: shut down cleanly below
        while not stop:
            time.sleep(1)
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
