"""The Kubernetes manifests: overlays render, every object validates, alerts load, metric names are real.

- Overlays render with kustomize (``kubectl kustomize``, kustomize built into kubectl).
- Core kinds pass ``kubernetes-validate --strict``; RayService (and its cluster spec as a RayCluster)
  validate against the KubeRay CRD schemas in ``../shared/k8s-schemas/`` with unknown fields refused,
  as ``kubectl apply --validate=strict`` would.
- serveConfigV2 equals the cluster Serve config (one source of truth) and the generated patches are
  up to date; ``promtool check rules`` accepts the PrometheusRule.
- Every metric the dashboard and alerts query is exported by the running app (the ``stack``
  fixture's exporter), except Ray's GPU node metrics, checked against Ray's source instead.
- One Redis (StatefulSet, Service, Secret) backs both Ray's GCS fault tolerance and the app's
  control plane: same Service, same Secret; its arguments start a real ``redis-server`` and its
  probes pass against it.
"""

from __future__ import annotations

import base64
import copy
import functools
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
OVERLAYS = ("dev", "gpu")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}  # Prometheus Operator CRDs
K8S_VERSION = "1.32.0"
# Ray's GPU node metrics: absent on a CPU-only exporter, so checked against Ray's reporter source.
GPU_METRICS = {"ray_node_gpus_utilization", "ray_node_gram_used", "ray_node_gram_available"}
# Counters of events a healthy test run never produces (a series appears at its first increment):
# checked against their definition in serve/observability/metrics.py instead.
RARE_COUNTERS = {"ray_img2img_generation_failures_total"}


def _tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` not found: {hint}", pytrace=False)
    return path


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    kubectl = _tool("kubectl", "kubectl (with built-in kustomize) renders the overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / request.param)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return request.param, [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} {kind} objects"
    return matches[0]


def _named(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{len(matches)} {kind} objects named {name}"
    return matches[0]


def _containers(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def test_generated_serve_config_patches_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(K8S / "render.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_serve_config_v2_is_the_cluster_serve_config(rendered):
    overlay, docs = rendered
    sys.path.insert(0, str(K8S))
    try:
        import render
    finally:
        sys.path.remove(str(K8S))
    serve_config = yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])
    if overlay == "gpu":
        assert serve_config == yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    else:
        assert serve_config == render.dev_serve_config()
        assert serve_config["applications"][0]["args"]["models"][0]["num_gpus"] == 0


def test_every_core_object_passes_kubernetes_validate_strict(rendered, tmp_path):
    import kubernetes_validate

    overlay, docs = rendered
    core = [d for d in docs if d["kind"] not in CRD_FILES and d["kind"] not in OPERATOR_KINDS]
    assert {d["kind"] for d in core} >= {"Namespace", "StatefulSet", "Service", "Job", "ConfigMap"}
    for doc in core:  # one by one, so a schema that is missing fails instead of being skipped
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    manifest = tmp_path / f"{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(
        [str(cli), "--strict", "-k", K8S_VERSION, str(manifest)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _strict(schema):
    """A CRD's structural schema as JSON Schema that refuses unknown fields (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> jsonschema.Validator:
    path = SCHEMAS / CRD_FILES[kind]
    assert path.exists(), f"{path} missing: CI runs with shared/ beside the repository"
    crd = yaml.safe_load(path.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def test_rayservice_and_its_cluster_validate_against_the_kuberay_crds(rendered):
    _, docs = rendered
    rayservice = _one(docs, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": "img2img"},
        "spec": rayservice["spec"]["rayClusterConfig"],
    }
    for kind, doc in (("RayService", rayservice), ("RayCluster", cluster)):
        errors = sorted(_crd_validator(kind).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{kind} {'.'.join(map(str, e.path))}: {e.message}" for e in errors)

    # The validator does catch mistakes: a misspelt field is refused.
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert list(_crd_validator("RayService").iter_errors(broken))


def test_gpu_overlay_autoscales_gpu_workers_from_zero(rendered):
    overlay, docs = rendered
    rayservice = _one(docs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    containers = _containers(rayservice)
    for container in containers.values():
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["readinessProbe"] and container["livenessProbe"]
        assert {e["secretRef"]["name"] for e in container["envFrom"]} == {"img2img-s3", "img2img-api-keys"}
    workers = cluster["workerGroupSpecs"][0]
    env = {e["name"]: e.get("value") for e in containers[workers["groupName"]]["env"]}
    gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert workers["minReplicas"] == 0 and workers["maxReplicas"] >= 1 and gpus == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in workers["template"][
            "spec"
        ]["tolerations"]
        assert env["HF_HUB_OFFLINE"] == "0"
        assert not [d for d in docs if d["kind"] == "Secret"], "production Secrets are created out of band"
    else:
        assert gpus is None and "tolerations" not in workers["template"]["spec"]
        assert env["HF_HUB_OFFLINE"] == "1"


def test_minio_statefulset_secret_and_bucket_job(rendered):
    overlay, docs = rendered
    statefulset, job = _named(docs, "StatefulSet", "minio"), _one(docs, "Job")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {p["port"] for p in _named(docs, "Service", "minio")["spec"]["ports"]} >= {9000}
    minio_env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]
        if "valueFrom" in e
    }
    assert {ref["name"] for ref in minio_env.values()} == {"img2img-s3"}
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    bucket = yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"][
        "storage"
    ]
    assert bucket["kind"] == "s3" and f"store/{bucket['bucket']}" in script
    if overlay == "dev":
        secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "img2img-s3")
        assert {"IMG2IMG_S3_ENDPOINT", "IMG2IMG_S3_ACCESS_KEY", "IMG2IMG_S3_SECRET_KEY"} <= set(
            secret["stringData"]
        )
        assert set(minio_env) == {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


REDIS_SECRET = "img2img-redis"
# KubeRay refuses these on the head when gcsFaultToleranceOptions is set (it sets them itself).
KUBERAY_OWNED_ENV = {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "REDIS_USERNAME"}


def _env_refs(container: dict) -> dict[str, dict]:
    """name -> secretKeyRef of a container's env entries read from a Secret."""
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _redis(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(StatefulSet, its container, Service) of the base's Redis."""
    statefulset = _named(docs, "StatefulSet", "redis")
    return (
        statefulset,
        statefulset["spec"]["template"]["spec"]["containers"][0],
        _named(docs, "Service", "redis"),
    )


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Mi/Gi) or a Redis size (mb/gb) in bytes."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()
    return int(number) * {"": 1, "Mi": 2**20, "Gi": 2**30, "mb": 2**20, "gb": 2**30}[unit]


def test_redis_statefulset_service_and_secret(rendered):
    overlay, docs = rendered
    statefulset, container, service = _redis(docs)
    spec = statefulset["spec"]
    assert spec["replicas"] == 1 and spec["serviceName"] == "redis"
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-[a-z0-9]+)?", container["image"]), "pin a Redis 7 release"
    assert container["image"].startswith("redis:7.")
    args = container["args"]
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--requirepass"] == "$(REDIS_PASSWORD)" and options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"  # a dropped lease or GCS table is data loss
    refs = _env_refs(container)
    assert refs["REDIS_PASSWORD"] == refs["REDISCLI_AUTH"] == {"name": REDIS_SECRET, "key": "password"}
    # The append-only file lands on the claimed volume.
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": options["--dir"]} in container["volumeMounts"]
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] and _bytes(options["--maxmemory"]) < _bytes(limits["memory"])
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli" in command and "ping" in command and "PONG" in command, command
    pod_security = spec["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # The Service reaches the pod on the port Redis listens on.
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 6379
    assert {"name": port["targetPort"], "containerPort": 6379} in container["ports"]
    secrets = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == REDIS_SECRET]
    if overlay == "dev":
        (secret,) = secrets
        # It goes into IMG2IMG_REDIS_URL as is, so it must need no percent-encoding.
        assert re.fullmatch(r"[A-Za-z0-9._~-]{16,}", secret["stringData"]["password"])
    else:
        assert not secrets, "production's Redis password is created out of band"


def test_rayservice_uses_the_same_redis_for_gcs_and_the_control_plane(rendered):
    overlay, docs = rendered
    rayservice = _one(docs, "RayService")
    _, redis_container, service = _redis(docs)
    redis_secret = _env_refs(redis_container)["REDIS_PASSWORD"]
    cluster = rayservice["spec"]["rayClusterConfig"]

    # GCS fault tolerance: the Redis Service, the password from the Secret Redis itself uses.
    ft = cluster["gcsFaultToleranceOptions"]
    address = urllib.parse.urlsplit("//" + ft["redisAddress"].removeprefix("redis://"))
    assert address.hostname in {"redis", f"redis.{service['metadata']['namespace']}.svc"}
    assert address.port == service["spec"]["ports"][0]["port"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == redis_secret
    assert "ray.io/ft-enabled" not in rayservice["metadata"].get("annotations", {})
    assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]

    # The control plane: IMG2IMG_REDIS_URL on the head and every worker group, built from the same Secret.
    containers = _containers(rayservice)
    assert set(containers) == {"head", cluster["workerGroupSpecs"][0]["groupName"]}
    for group, container in containers.items():
        names = [e["name"] for e in container["env"]]
        if group == "head":
            assert not KUBERAY_OWNED_ENV & set(names), "KubeRay refuses these with gcsFaultToleranceOptions"
        (entry,) = [e for e in container["env"] if e["name"] == "IMG2IMG_REDIS_URL"]
        url = entry["value"]
        # Kubernetes expands $(VAR) only for variables defined earlier in the same list.
        refs = _env_refs(container)
        for var in re.findall(r"\$\((\w+)\)", url):
            assert var in names[: names.index("IMG2IMG_REDIS_URL")], (
                f"{group}: $({var}) is not defined before"
            )
            assert refs[var] == redis_secret, f"{group}: $({var}) must come from the Redis Secret"
        parsed = urllib.parse.urlsplit(url)
        assert (
            parsed.scheme == "redis" and parsed.hostname == address.hostname and parsed.port == address.port
        )
        assert re.fullmatch(r"\$\(\w+\)", parsed.password or ""), f"{group}: the password must be a reference"
        assert parsed.path == "/0"

    # The production Serve config turns the Redis control plane on; both overlays' configs are valid.
    from serve.config import AppArgs

    args = AppArgs.model_validate(
        yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    )
    if overlay == "gpu":
        assert args.control_plane.kind == "redis"
        assert args.control_plane.coordinators.min_replicas >= 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_redis_manifest_starts_a_real_redis_server_and_its_probes_pass(tmp_path):
    """The StatefulSet's arguments as redis-server reads them, and its probes against that server."""
    binary = _tool("redis-server", "install Debian's redis-server package (scripts/setup.sh does)")
    _tool("redis-cli", "Debian's redis-server package brings redis-cli (redis-tools)")
    docs = [d for d in yaml.safe_load_all((K8S / "base" / "redis.yaml").read_text()) if d]
    _, container, _ = _redis(docs)
    password, port = "probe-test-password-3b9c", _free_port()
    args = [
        password if a == "$(REDIS_PASSWORD)" else str(tmp_path) if a == "/data" else a
        for a in container["args"]
    ]
    assert password in args and str(tmp_path) in args
    server = subprocess.Popen(
        [binary, *args, "--port", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def probe(probe_name: str, auth: str) -> int:
            command = list(container[probe_name]["exec"]["command"])
            command[-1] = command[-1].replace("redis-cli", f"redis-cli -p {port}", 1)
            env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "REDISCLI_AUTH": auth}
            return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode

        deadline = time.monotonic() + 10
        while probe("readinessProbe", password) != 0:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "redis-server did not answer PONG"
            time.sleep(0.1)
        assert probe("livenessProbe", password) == 0
        # A wrong password fails the probe (redis-cli itself exits 0 on NOAUTH).
        assert probe("readinessProbe", "wrong-password") != 0
        assert (tmp_path / "appendonlydir").is_dir() or (tmp_path / "appendonly.aof").exists()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_monitors_select_ray_pods_by_the_metrics_port(rendered):
    _, docs = rendered
    rayservice = _one(docs, "RayService")
    for container in _containers(rayservice).values():
        assert {"name": "metrics", "containerPort": 8080} in container["ports"]
    assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    assert _one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    dashboard = _one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    json.loads(dashboard["data"]["img2img-dashboard.json"])


def test_promtool_accepts_the_alert_rules(tmp_path):
    promtool = _tool("promtool", "install Debian's prometheus package (scripts/setup.sh does)")
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 5


def _queries() -> list[str]:
    """Every PromQL expression of the dashboard and the alert rules."""
    dashboard = json.loads((K8S / "base" / "grafana" / "img2img-dashboard.json").read_text())
    rule = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]] + [
        r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]
    ]


def _metric_names(expressions: list[str]) -> set[str]:
    names = set()
    for expr in expressions:
        for name in re.findall(r"\bray_[a-z0-9_]+", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


def test_dashboard_covers_what_operators_ask_for():
    dashboard = json.loads((K8S / "base" / "grafana" / "img2img-dashboard.json").read_text())
    text = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel["targets"])
    for needle in (
        "ray_img2img_requests_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "ray_img2img_queue_wait_seconds_bucket",
        "ray_img2img_unet_calls_total",
        "ray_serve_deployment_replica_healthy",
        "ray_node_gpus_utilization",
        "ray_node_gram_used",
        "by (tenant)",
    ):
        assert needle in text, needle


def test_gpu_metric_names_exist_in_rays_reporter():
    """Ray's node exporter defines these gauges (reporter_agent.METRICS_GAUGES, exported as ray_<name>)."""
    from ray.dashboard.modules.reporter.reporter_agent import METRICS_GAUGES

    assert {f"ray_{name}" for name in METRICS_GAUGES} >= GPU_METRICS


def _exported_names(metrics_url: str) -> set[str]:
    text = httpx.get(f"http://{metrics_url}/metrics", timeout=10).text
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
    return names


def test_every_queried_metric_is_exported_by_the_running_app(stack):
    """Send traffic through every code path the queries read, then compare names with the exporter."""
    wanted = _metric_names(_queries())
    headers = stack.headers
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 60, 200)).save(buffer, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    seen: set[str] = set()
    missing = wanted
    deadline = time.monotonic() + 90
    while missing and time.monotonic() < deadline:
        response = httpx.post(
            f"{stack.base_url}/v1/image-to-image",
            headers=headers,
            json={"image": image, "prompt": "metrics probe", "steps": 2},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        seen |= _exported_names(stack.metrics_url)  # a union: a scrape can miss a series
        missing = wanted - GPU_METRICS - RARE_COUNTERS - seen
        if missing:
            time.sleep(2)
    assert not missing, f"queried but not exported: {sorted(missing)}"


def test_rare_counters_are_defined_by_the_app():
    source = (ROOT / "serve" / "observability" / "metrics.py").read_text()
    queried = _metric_names(_queries())
    for name in RARE_COUNTERS & queried:
        base = name.removeprefix("ray_").removesuffix("_total")
        assert re.search(rf'Counter\(\s*"{base}"', source), (
            f"{name}: no Counter({base!r}) in serve/observability/metrics.py"
        )


def test_cluster_launcher_config_matches_rays_schema():
    """cluster/cluster_launcher.yaml: Ray's launcher schema, GPU workers from 0, the canonical config."""
    import ray.autoscaler

    config = yaml.safe_load((ROOT / "cluster" / "cluster_launcher.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["inference_node"] == 1
    assert any("serve deploy cluster/serve_config.yaml" in c for c in config["head_start_ray_commands"])


def test_dockerfile_builds_the_project_on_a_cuda_ray_image():
    dockerfile = (K8S / "Dockerfile").read_text()
    rayservice = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    version = rayservice["spec"]["rayClusterConfig"]["rayVersion"]
    assert f"ARG BASE_IMAGE=rayproject/ray:{version}-py311-gpu" in dockerfile
    assert f'"ray[serve]=={version}"' in (ROOT / "pyproject.toml").read_text()
    assert 'VOLUME ["/models"]' in dockerfile and "ensure_tiny_models('/app/.cache/models')" in dockerfile
