#!/usr/bin/env bash
# Lint and test hf-fedlora offline: sets up .venv if needed, then `ruff check .`, pytest, and the Flower tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k offline_assets -x`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"

# Nothing can be fetched from the Hugging Face Hub: models and data come from pip packages.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

# The Flower apps need their own environment (flwr pins older typer/rich/packaging than the core install):
# scripts/test_flower.sh builds .venv-flower and runs tests/test_flower.py (in-process Grid and a loopback
# deployment). Skipped when arguments select core tests, or with HF_FEDLORA_SKIP_FLOWER=1.
if [ "$#" -eq 0 ] && [ "${HF_FEDLORA_SKIP_FLOWER:-0}" != "1" ]; then
    bash "$ROOT/scripts/test_flower.sh"
fi
