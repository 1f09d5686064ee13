#!/usr/bin/env bash
# Run the main job: federated FFA-LoRA fine-tuning of the offline MiniLM on the offline tweets under DP,
# printing per-round accuracy and epsilon. Sets up .venv if needed; extra arguments go to `hf-fedlora demo`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=setup_env.sh
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"

# Nothing can be fetched from the Hugging Face Hub: models and data come from pip packages.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false

exec .venv/bin/hf-fedlora demo "$@"
