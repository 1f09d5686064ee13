"""Where the secret DP state lives: apart from every artefact a user shares.

The states of the Poisson sampler and of the noise generator regenerate every batch and every noise tensor a run
drew: whoever reads them can subtract the noise. They are written here, in a private folder outside `output_dir`
(owner-only permissions), never in a checkpoint, an adapter folder or anything `push_to_hub` could send. A
checkpoint names its run's secret state by a random run id; resuming without that state is refused (its noise would
be drawn again, or its spend forgotten).

The folder is `$HF_FEDLORA_SECRET_DIR` if set, else `~/.cache/hf_fedlora/secret_state`, or the one a driver passes.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..atomic_json import write_json_atomically

SECRET_DIR_ENV = "HF_FEDLORA_SECRET_DIR"


def default_secret_dir() -> Path:
    configured = os.environ.get(SECRET_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hf_fedlora" / "secret_state"


def new_run_id() -> str:
    """A random name for one run's secret state (not itself secret: it only says which file to read)."""
    return secrets.token_hex(12)


class SecretStore:
    """One run's secret state, as a JSON file in a private folder, written atomically."""

    def __init__(self, run_id: str, directory: str | os.PathLike | None = None):
        if not run_id or not all(c in "0123456789abcdef" for c in run_id):
            raise ValueError(f"run_id must be a hex token (from new_run_id), got {run_id!r}")
        self.run_id = run_id
        self.directory = Path(directory) if directory is not None else default_secret_dir()
        self.path = self.directory / f"{run_id}.json"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, Any]:
        if not self.exists():
            raise FileNotFoundError(
                f"The run's secret DP state ({self.path}) is missing. Resuming without it would draw its noise "
                f"again or forget what it spent: restore it (or set ${SECRET_DIR_ENV} to the folder that holds it), "
                "or start a new run from scratch."
            )
        with open(self.path, encoding="utf-8") as handle:
            return json.load(handle)

    def save(self, state: dict[str, Any]) -> None:
        """Written atomically, with owner-only permissions on the folder and the file."""
        write_json_atomically(self.path, state, private=True)
