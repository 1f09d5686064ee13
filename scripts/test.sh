#!/usr/bin/env bash
# Lint and test hf-fedlora offline: sets up .venv if needed, then `ruff check .` and pytest.
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
