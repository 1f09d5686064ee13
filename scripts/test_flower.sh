#!/usr/bin/env bash
# Build the Flower venv (.venv-flower, separate from .venv: flwr needs older typer, rich and packaging than the core
# pins) if needed, then run tests/test_flower.py in it. Idempotent: a stamp newer than pyproject.toml and
# constraints-flower.txt skips pip. No Ray: the tests use an in-process Grid and a loopback deployment.
# Extra arguments go to pytest, e.g. `bash scripts/test_flower.sh -k equals`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-flower"
STAMP="$VENV/.hf_fedlora_flower_stamp"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "test_flower: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints-flower.txt" -nt "$STAMP" ] \
    || [ ! -x "$VENV/bin/flower-superlink" ]; then
    echo "test_flower: installing hf-fedlora[test,demo,flower] into $VENV (first run: a few minutes)" >&2
    # torch pinned in the same command, or pip may resolve a multi-GB CUDA build.
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints-flower.txt" -e "$ROOT[test,demo,flower]" \
        torch==2.13.0
    touch "$STAMP"
fi

cd "$ROOT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
"$VENV/bin/python" -m pytest tests/test_flower.py tests/test_secure_sum.py "$@"
