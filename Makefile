# The two commands that matter: `make run` (the service on embedded defaults) and `make test`.
# Each installs what it needs into .venv from nothing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run demo test audit unit integration lint format bench gpu-wheels gpu-check clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m serve.local

demo: setup
	$(PY) -m inference.demo --out out/demo

# lint-imports: the architecture's import contracts ([tool.importlinter] in pyproject.toml).
test: setup audit
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-logo --cache-dir .cache/import_linter
	$(PY) -m pytest

# pip check, the offline security floors (scripts/security_floors.toml) and pip-audit when a
# vulnerability database answers; AUDIT_REQUIRE_ONLINE=1 also fails when none does.
audit: setup
	$(PY) scripts/audit_dependencies.py

unit: setup
	$(PY) -m pytest tests/unit

integration: setup
	$(PY) -m pytest tests/integration

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench: setup
	$(PY) benchmarks/engine_batching.py

# The GPU check (benchmarks/gpu_check.py, ~7 min on one H100/H200). `make gpu-wheels` here fetches
# into .whl/ the pinned wheels the GPU machine lacks (diffusers & co); there, with .whl carried,
# `make gpu-check` (or `bash scripts/gpu_check_remote.sh`) installs them to /tmp/site when diffusers
# is not importable and runs the check; with $OUT set the table, JSON and log land there. Neither
# target needs .venv on the GPU machine. GPU_CHECK_ARGS passes options, e.g. "--skip compile".
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

gpu-wheels: setup
	bash scripts/gpu_wheels.sh

gpu-check:
	PY=$(GPU_PY) bash scripts/gpu_check_remote.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache out var .pytest_cache .ruff_cache
