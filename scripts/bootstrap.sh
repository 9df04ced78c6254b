#!/usr/bin/env bash
# Create the project-local venv (.venv) if missing and install the pinned dependency set.
# The ONE place that chooses the CPU or CUDA dependency set:
#   CEL_DEVICE=cpu|cuda (default: cuda when `nvidia-smi` works, else cpu).
# Re-runs are cheap: a stamp keyed on pyproject.toml and this script skips a finished install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CEL_VENV:-.venv}
PY=${PYTHON:-python3}
if [[ -z "${CEL_DEVICE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then CEL_DEVICE=cuda; else CEL_DEVICE=cpu; fi
fi
STAMP="$VENV/.cel-installed-$CEL_DEVICE-$(cat pyproject.toml scripts/bootstrap.sh | sha1sum | cut -c1-12)"
if [[ -f "$STAMP" ]]; then exit 0; fi
echo "[bootstrap] setting up $VENV for $CEL_DEVICE (one-time, a few minutes)" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if [[ "$CEL_DEVICE" == "cpu" ]]; then
  # torch first and pinned, so nothing later can pull a CUDA build.
  "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e ".[cpu,test,bench]"
  "${PIP[@]}" --no-deps "torchrec==1.8.0"
else
  "${PIP[@]}" -e ".[cuda,test,bench]"
fi
"$VENV/bin/python" -c "import torch, torchrec, fbgemm_gpu, ray, pyarrow, wandb; print('[bootstrap] torch', torch.__version__, 'torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0', 'ray', ray.__version__)" >&2
rm -f "$VENV"/.cel-installed-* && touch "$STAMP"
