#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): CUDA tests, ML-100K CEL@50 and full MF on the
# device and on the CPU, the 1e7-entity step benchmark and the CEL ops benchmark, in one run
# (under 8 minutes on one H100/H200), writing bench/results/gpu_check.json and a summary.
#
#   bash scripts/gpu_check.sh [--cpu] [bench.gpu_check options]
#
# On a GPU machine without registry access, the packages its torch lacks travel with the tree
# as wheels in .whl/ (ignored by git; `bash scripts/gpu_check.sh --fetch-wheels` downloads them
# here: torchrec and fbgemm-gpu-cpu matching the machine's torch 2.11, Python 3.12): they are
# installed into a temporary path, nothing else is touched. `--cpu` runs everything on the CPU
# at toy sizes, in seconds, with this checkout's .venv (the CI smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
# torch 2.11 <-> fbgemm-gpu-cpu 1.6.0 <-> torchrec 1.6.1 (the release pairs of the two projects)
GPU_WHEELS=(fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 tensordict==0.15.3 "pyvers>=0.2,<0.3")

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "${GPU_WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w "$WHEELS" iopath==0.1.10      # published as an sdist only
  ls -la "$WHEELS"
  exit 0
fi

if [[ " $* " == *" --cpu "* ]]; then
  PY=${PY:-.venv/bin/python}
  [[ -x "$PY" ]] || PY=python3
else
  PY=${PY:-python3}
  if ! "$PY" -c "import torchrec" 2>/dev/null; then
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check: no torchrec and no wheels in $WHEELS (run --fetch-wheels where pip works)" >&2; exit 2; }
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" -m bench.gpu_check "$@"
