#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.py needs on the GPU machine, downloaded into .whl/ (git-ignored).
#
# That machine has CUDA torch, transformers, numpy, Pillow, huggingface_hub, safetensors, regex,
# requests and filelock, but not diffusers. This fetches diffusers at the version in .venv (the one the
# tests ran) and its requirements the machine lacks: importlib_metadata (and its zipp, so the pair
# matches). All are pure-Python wheels, about 5 MiB together. Never torch: the machine's CUDA build
# must stay. Installed there by scripts/gpu_check_remote.sh (or `make gpu-check`), which needs
# `.whl` named in the call's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEST=${DEST:-.whl}
PACKAGES=(diffusers importlib_metadata zipp)
py="$VENV/bin/python"
if [ ! -x "$py" ]; then
  echo "no $py: run 'make setup' first (the wheels are pinned to the versions installed there)" >&2
  exit 1
fi
mkdir -p "$DEST"
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")
  pins+=("$name==$version")
  # One version of each (two would stop the install there): drop other versions from earlier runs.
  for old in "$DEST/${name}"-*.whl; do
    if [ -e "$old" ] && [[ "$old" != "$DEST/${name}-${version}-"* ]]; then
      rm -f -- "$old"
    fi
  done
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"
if compgen -G "$DEST/torch-*.whl" >/dev/null; then
  echo "$DEST holds a torch wheel: remove it, it would replace the GPU machine's CUDA build" >&2
  exit 1
fi
echo "pinned: ${pins[*]}"
ls -l "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
