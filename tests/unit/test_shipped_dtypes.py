"""Every model a shipped Serve config serves runs in a (family, dtype) the tests really exercise.

The shipped configs are ``cluster/serve_config*.yaml`` and every ``serveConfigV2`` embedded in a
KubeRay ``RayService`` under ``k8s/`` (the generated overlay patches). For each model they name,
with the dtype ``ModelSpec`` defaults to when a spec names none:

1. (family, dtype) must be engine-tested: in ``TESTED_DTYPES`` of ``tests/unit/test_engine_precision.py``
   (float32 by ``tests/unit/test_engine.py``, the half dtypes there, each against the stock
   pipeline), and not merely listed: a ``pytest --collect-only`` of those modules must show a test
   parametrised with that family and dtype (``test_engine``'s family-parametrised tests run the tiny
   models, in the dtype their specs leave to the default).
2. every ``optimize.compile`` mode a model names (anywhere under its entry; no shipped config has
   an ``optimize`` block yet) must be ``off`` or a mode a test module lists in
   ``TESTED_COMPILE_MODES`` and parametrises over.
3. each family a config ships must be served over HTTP by an integration test in at least one of
   the dtypes shipped for it: ``SERVED_DTYPES`` of ``tests/integration/test_half_precision_stack.py``
   or the session stack's own model (``tests/integration/conftest.py: _stack_args``).
   Why one dtype per family suffices over HTTP: the serving layer treats ``dtype`` as an opaque
   string from the config to ``load_pipeline``; everything that depends on its value (loading,
   VAE upcast, scheduler arithmetic, decode) is below the engine, which rule 1 holds to the stock
   pipeline for each (family, dtype). The HTTP test proves the path from a non-default dtype in the
   config to a replica and back to PNG bytes per family, which differs between families (SDXL's
   extra encoders and VAE upcast, pix2pix's three-row guidance), not between dtypes.

The checker is ``coverage_problems``; the negative tests feed it synthetic configs (and a synthetic
file tree) with untested pairs to show that it fails, naming the file and model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from inference.models import DTYPES, Family, ModelSpec

ROOT = Path(__file__).resolve().parents[2]
PRECISION_MODULE = "tests/unit/test_engine_precision.py"
ENGINE_MODULE = "tests/unit/test_engine.py"  # float32 engine tests, every family, tiny models
OPTIMIZE_MODULE = "tests/unit/test_optimize.py"
SHAPES_MODULE = "tests/unit/test_engine_shapes.py"  # the compiled, warmed-up UNet per compile mode
HTTP_MODULE = "tests/integration/test_half_precision_stack.py"
#: The configs this repository ships; finding fewer means the search below went blind.
EXPECTED_CONFIGS = {
    "cluster/serve_config.yaml",
    "cluster/serve_config.local.yaml",
    "k8s/overlays/gpu/serve-config.yaml",
    "k8s/overlays/dev/serve-config.yaml",
}
DEFAULT_DTYPE = ModelSpec.__dataclass_fields__["dtype"].default
FAMILIES = tuple(f.value for f in Family)


# ---- the shipped configs ---------------------------------------------------------------------------


def find_serve_configs(root: Path) -> dict[str, dict]:
    """``{origin: Serve config}``: cluster/*.yaml with applications, and k8s RayServices' serveConfigV2."""
    found: dict[str, dict] = {}
    for path in sorted((root / "cluster").glob("*.y*ml")):
        config = yaml.safe_load(path.read_text())
        if isinstance(config, dict) and "applications" in config:
            found[path.relative_to(root).as_posix()] = config
    for path in sorted((root / "k8s").rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "RayService":
                continue
            embedded = (doc.get("spec") or {}).get("serveConfigV2")
            if isinstance(embedded, str):
                found[path.relative_to(root).as_posix()] = yaml.safe_load(embedded)
    return found


@dataclass(frozen=True)
class ShippedModel:
    origin: str
    app: str
    model: str
    family: str
    dtype: str
    compile_modes: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return f"{self.origin}: application {self.app!r}, model {self.model!r}"


def _compile_modes(entry: Any) -> Iterator[str]:
    """Every ``optimize.compile`` under a model entry (``off`` when an optimize block leaves it out)."""
    if isinstance(entry, dict):
        for key, value in entry.items():
            if key == "optimize" and isinstance(value, dict):
                mode = value.get("compile", "off")
                yield mode if isinstance(mode, str) else ("default" if mode else "off")  # a boolean
            yield from _compile_modes(value)
    elif isinstance(entry, list):
        for item in entry:
            yield from _compile_modes(item)


def shipped_models(origin: str, config: dict) -> list[ShippedModel]:
    models = []
    for app in config.get("applications") or []:
        for entry in (app.get("args") or {}).get("models") or []:
            spec = entry.get("spec") or {}
            models.append(
                ShippedModel(
                    origin=origin,
                    app=str(app.get("name")),
                    model=str(spec.get("id")),
                    family=str(spec.get("family")),
                    dtype=str(spec.get("dtype", DEFAULT_DTYPE)),
                    compile_modes=tuple(sorted(set(_compile_modes(entry)))),
                )
            )
    return models


# ---- what the tests exercise -----------------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    dtypes: frozenset[tuple[str, str]]  # (family, dtype) the engine tests run against stock
    compile_modes: frozenset[str]
    served_over_http: frozenset[tuple[str, str]]  # (family, dtype) an integration test serves


def coverage_problems(models: Iterable[ShippedModel], coverage: Coverage) -> list[str]:
    """One line per shipped model, compile mode or family that the tests do not cover (empty: all good)."""
    models = list(models)
    problems = []
    for m in models:
        if (m.family, m.dtype) not in coverage.dtypes:
            problems.append(
                f"{m.where} ships (family {m.family!r}, dtype {m.dtype!r}), which no engine test runs: "
                f"TESTED_DTYPES ({PRECISION_MODULE}, parametrised) covers {sorted(coverage.dtypes)}"
            )
        for mode in m.compile_modes:
            if mode not in coverage.compile_modes:
                problems.append(
                    f"{m.where} ships optimize.compile {mode!r}, which no test runs: tested modes "
                    f"{sorted(coverage.compile_modes)} (TESTED_COMPILE_MODES of a test module)"
                )
    by_family: dict[str, list[ShippedModel]] = {}
    for m in models:
        by_family.setdefault(m.family, []).append(m)
    for family, shipped in sorted(by_family.items()):
        dtypes = sorted({m.dtype for m in shipped})
        if not any((family, dtype) in coverage.served_over_http for dtype in dtypes):
            places = "; ".join(m.where for m in shipped)
            problems.append(
                f"family {family!r} is shipped in dtype(s) {dtypes} ({places}), but no integration test "
                f"serves any of them over HTTP (served: {sorted(coverage.served_over_http)}); add one to "
                f"SERVED_DTYPES in {HTTP_MODULE}"
            )
    return problems


#: Run in a fresh interpreter: collect the test modules (importing torch stays out of this process)
#: and dump, per module, its TESTED_* constants and each collected test's parameter values.
_COLLECT = textwrap.dedent(
    """
    import importlib, json, sys
    from pathlib import Path
    import pytest

    def scalars(value):
        if isinstance(value, (tuple, list, set, frozenset)):
            for item in value:
                yield from scalars(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from scalars(item)
        else:
            text = str(getattr(value, "value", value)).lower()
            yield text[len("torch."):] if text.startswith("torch.") else text

    class Dump:
        def __init__(self):
            self.items = {}

        def pytest_collection_modifyitems(self, items):
            for item in items:
                callspec = getattr(item, "callspec", None)
                self.items[item.nodeid] = sorted(set(scalars(callspec.params))) if callspec else []

    out, paths = sys.argv[1], sys.argv[2:]
    dump = Dump()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *paths], plugins=[dump])
    modules = {}
    for path in paths:
        module = importlib.import_module(path[:-3].replace("/", "."))
        attrs = {}
        if hasattr(module, "TESTED_DTYPES"):
            pairs = module.TESTED_DTYPES
            attrs["TESTED_DTYPES"] = sorted([str(getattr(x, "value", x)) for x in p] for p in pairs)
        if hasattr(module, "TESTED_COMPILE_MODES"):
            attrs["TESTED_COMPILE_MODES"] = sorted(str(mode) for mode in module.TESTED_COMPILE_MODES)
        items = {k: v for k, v in dump.items.items() if k.split("::")[0] == path}
        modules[path] = {"attrs": attrs, "items": items}
    from inference.models import ModelSpec
    from inference.tiny import tiny_model_specs
    tiny = {s["family"]: ModelSpec(**s).dtype for s in tiny_model_specs(Path("unused"))}
    Path(out).write_text(json.dumps({"code": int(code), "modules": modules, "tiny_dtypes": tiny}))
    """
)


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> dict:
    if not (ROOT / PRECISION_MODULE).is_file():
        pytest.fail(
            f"{PRECISION_MODULE} does not exist: the engine precision tests must exist and expose "
            "TESTED_DTYPES, the (family, dtype) pairs they parametrise over; without them no shipped "
            "half-precision config is known to work",
            pytrace=False,
        )
    out = tmp_path_factory.mktemp("collect") / "collected.json"
    modules = (PRECISION_MODULE, ENGINE_MODULE, OPTIMIZE_MODULE, SHAPES_MODULE)
    paths = [p for p in modules if (ROOT / p).is_file()]
    result = subprocess.run(
        [sys.executable, "-c", _COLLECT, str(out), *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 or not out.exists() or json.loads(out.read_text())["code"] != 0:
        output = (result.stdout + result.stderr)[-3000:]
        pytest.fail(
            f"collecting {paths} failed (exit {result.returncode}):\n{output}",
            pytrace=False,
        )
    data = json.loads(out.read_text())
    if "TESTED_DTYPES" not in data["modules"][PRECISION_MODULE]["attrs"]:
        pytest.fail(
            f"{PRECISION_MODULE} has no module-level TESTED_DTYPES: expose the frozenset of "
            '(family value, dtype) pairs its tests parametrise over, e.g. ("sd", "float16")',
            pytrace=False,
        )
    return data


def _exercised_dtypes(data: dict) -> set[tuple[str, str]]:
    """(family, dtype) pairs that some collected test is really parametrised with."""
    pairs = set()
    for path, module in data["modules"].items():
        for params in module["items"].values():
            families = [f for f in FAMILIES if f in params]
            dtypes = [d for d in DTYPES if d in params]
            if path == ENGINE_MODULE and not dtypes:  # the tiny models, in their specs' dtype
                dtypes = [data["tiny_dtypes"][f] for f in families]
            pairs |= {(f, d) for f in families for d in dtypes}
    return pairs


def _claimed_dtypes(data: dict) -> set[tuple[str, str]]:
    return {tuple(pair) for pair in data["modules"][PRECISION_MODULE]["attrs"]["TESTED_DTYPES"]}


def _tested_compile_modes(data: dict) -> set[str]:
    """``off`` (every engine test) and each claimed TESTED_COMPILE_MODES entry its module parametrises."""
    modes = {"off"}
    for module in data["modules"].values():
        params = {p for values in module["items"].values() for p in values}
        modes |= set(module["attrs"].get("TESTED_COMPILE_MODES", ())) & params
    return modes


def _served_over_http() -> set[tuple[str, str]]:
    from tests.integration.conftest import _stack_args
    from tests.integration.test_half_precision_stack import SERVED_DTYPES

    main_stack = _stack_args(Path("tiny-sd"), "bucket")["models"]
    return set(SERVED_DTYPES) | {
        (m["spec"]["family"], m["spec"].get("dtype", DEFAULT_DTYPE)) for m in main_stack
    }


@pytest.fixture(scope="module")
def coverage(collected) -> Coverage:
    return Coverage(
        dtypes=frozenset(_claimed_dtypes(collected) & _exercised_dtypes(collected)),
        compile_modes=frozenset(_tested_compile_modes(collected)),
        served_over_http=frozenset(_served_over_http()),
    )


# ---- the real repository ---------------------------------------------------------------------------


def test_every_shipped_serve_config_is_found():
    found = find_serve_configs(ROOT)
    assert set(found) >= EXPECTED_CONFIGS, f"found only {sorted(found)}"
    for origin, config in found.items():
        assert shipped_models(origin, config), f"{origin}: no models found under applications[].args.models"


def test_tested_dtypes_are_well_formed_and_really_parametrised(collected):
    claimed = _claimed_dtypes(collected)
    assert claimed, f"{PRECISION_MODULE}: TESTED_DTYPES is empty"
    malformed = sorted(p for p in claimed if len(p) != 2 or p[0] not in FAMILIES or p[1] not in DTYPES)
    assert not malformed, (
        f"{PRECISION_MODULE}: TESTED_DTYPES has pairs that are not (family, dtype): {malformed}"
    )
    unexercised = sorted(claimed - _exercised_dtypes(collected))
    assert not unexercised, (
        f"{PRECISION_MODULE}: TESTED_DTYPES lists {unexercised}, but no collected test in "
        f"{PRECISION_MODULE} or {ENGINE_MODULE} is parametrised with that family and dtype"
    )


def test_every_shipped_model_runs_in_a_tested_dtype_and_compile_mode(coverage):
    models = [
        m for origin, config in find_serve_configs(ROOT).items() for m in shipped_models(origin, config)
    ]
    for m in models:
        print(f"{m.where}: {m.family} {m.dtype} compile {list(m.compile_modes) or 'absent'}")
    problems = coverage_problems(models, coverage)
    assert not problems, "\n".join(problems)


# ---- the checker fails on untested configs ---------------------------------------------------------

#: A stand-in for what the tests cover, so these cases do not depend on today's TESTED_DTYPES.
SYNTHETIC = Coverage(
    dtypes=frozenset({("sd", "float16"), ("sd", "float32"), ("sdxl", "float16")}),
    compile_modes=frozenset({"off"}),
    served_over_http=frozenset({("sd", "float16"), ("sdxl", "float16")}),
)


def _config(*models: dict) -> dict:
    entries = []
    for i, m in enumerate(models):
        spec = {"id": m.get("id", f"m{i}"), "family": m["family"], "source": "org/name"}
        if "dtype" in m:
            spec["dtype"] = m["dtype"]
        entries.append({"spec": spec, **({"optimize": m["optimize"]} if "optimize" in m else {})})
    return {"applications": [{"name": "img2img", "args": {"models": entries}}]}


NEGATIVE_CASES = {
    "sd-bfloat16": (
        _config({"id": "sd-bf16", "family": "sd", "dtype": "bfloat16"}),
        SYNTHETIC,
        "model 'sd-bf16' ships (family 'sd', dtype 'bfloat16'), which no engine test runs",
    ),
    "sdxl-float32": (
        _config({"id": "xl", "family": "sdxl", "dtype": "float32"}),
        SYNTHETIC,
        "model 'xl' ships (family 'sdxl', dtype 'float32'), which no engine test runs",
    ),
    "absent-dtype-is-float32": (
        _config({"id": "plain-xl", "family": "sdxl"}),
        SYNTHETIC,
        "model 'plain-xl' ships (family 'sdxl', dtype 'float32')",
    ),
    "untested-compile-mode": (
        _config({"id": "fast", "family": "sd", "dtype": "float16", "optimize": {"compile": "max-autotune"}}),
        SYNTHETIC,
        "model 'fast' ships optimize.compile 'max-autotune', which no test runs",
    ),
    "family-not-served-over-http": (
        _config({"id": "p2p", "family": "instruct-pix2pix", "dtype": "float16"}),
        replace(SYNTHETIC, dtypes=SYNTHETIC.dtypes | {("instruct-pix2pix", "float16")}),
        "family 'instruct-pix2pix' is shipped in dtype(s) ['float16']",
    ),
    "family-served-only-in-another-dtype": (
        _config({"id": "sd15", "family": "sd", "dtype": "float16"}),
        replace(SYNTHETIC, served_over_http=frozenset({("sd", "float32")})),
        "family 'sd' is shipped in dtype(s) ['float16'] (synthetic.yaml: application 'img2img', "
        "model 'sd15')",
    ),
}


@pytest.mark.parametrize(("config", "covered", "expected"), NEGATIVE_CASES.values(), ids=NEGATIVE_CASES)
def test_the_checker_refuses_an_untested_config(config, covered, expected):
    problems = coverage_problems(shipped_models("synthetic.yaml", config), covered)
    assert problems, "an untested config passed the checker"
    assert any(expected in p and "synthetic.yaml" in p for p in problems), problems


def test_the_checker_accepts_a_fully_tested_config():
    config = _config(
        {"family": "sd", "dtype": "float16", "optimize": {"compile": "off"}},
        {"family": "sd"},
        {"family": "sdxl", "dtype": "float16"},
    )
    assert coverage_problems(shipped_models("synthetic.yaml", config), SYNTHETIC) == []


def test_an_untested_dtype_in_a_shipped_file_tree_is_named_by_file_and_model(tmp_path, coverage):
    """The repository's configs plus a temporary bfloat16/float32 model, found on disk as CI would."""
    real = find_serve_configs(ROOT)
    untested = ("sd", "bfloat16")
    assert untested not in SYNTHETIC.dtypes
    (tmp_path / "cluster").mkdir()
    prod = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    prod["applications"][0]["args"]["models"].append(
        {"spec": {"id": "temp-untested", "family": untested[0], "source": "org/name", "dtype": untested[1]}}
    )
    (tmp_path / "cluster" / "serve_config.yaml").write_text(yaml.safe_dump(prod))
    overlay = tmp_path / "k8s" / "overlays" / "temp"
    overlay.mkdir(parents=True)
    embedded = yaml.safe_dump(_config({"id": "temp-embedded", "family": "sd", "dtype": "bfloat16"}))
    rayservice = {"apiVersion": "ray.io/v1", "kind": "RayService", "spec": {"serveConfigV2": embedded}}
    (overlay / "serve-config.yaml").write_text("# a comment\n" + yaml.safe_dump(rayservice))
    found = find_serve_configs(tmp_path)
    assert set(found) == {"cluster/serve_config.yaml", "k8s/overlays/temp/serve-config.yaml"}
    models = [m for origin, config in found.items() for m in shipped_models(origin, config)]
    problems = coverage_problems(models, SYNTHETIC)
    assert any(
        "cluster/serve_config.yaml: application 'img2img', model 'temp-untested'" in p
        and f"(family {untested[0]!r}, dtype {untested[1]!r})" in p
        for p in problems
    ), problems
    assert any(
        "k8s/overlays/temp/serve-config.yaml: application 'img2img', model 'temp-embedded'" in p
        for p in problems
    )
    # Against what the tests really cover (every valid pair today), a dtype no test runs is refused too.
    real_models = [m for origin, config in real.items() for m in shipped_models(origin, config)]
    bogus = replace(real_models[0], model="temp-bogus", dtype="float8_e4m3fn")
    assert any("model 'temp-bogus' ships" in p for p in coverage_problems([*real_models, bogus], coverage))
