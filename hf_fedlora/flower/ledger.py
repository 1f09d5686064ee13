"""A client's privacy ledger on its own disk: what its data have spent, and where its secret streams stand.

Under Flower a ClientApp runs in a fresh process per message and `context.state` lives in the SuperNode's
memory for one run: privacy state kept there would be lost on a restart, or worse, a re-derived noise
stream would repeat. So each client keeps one JSON ledger per data set (keyed by a hash of its examples,
not by the run): its accountant history (every run, composed), noise multiplier, step budget, and the
states of its secret Poisson sampler and noise generator. It is written atomically (temp file, fsync,
`os.replace`) BEFORE anything computed from those streams leaves the client.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset

LEDGER_VERSION = 1


def data_key(dataset: Dataset) -> str:
    """A hash of the client's examples (content, order and schema): the same data always find the same ledger,
    whatever run, node id or partition id they come with."""
    table = dataset.with_format("arrow")[:]
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def default_ledger_dir() -> Path:
    """`$HF_FEDLORA_LEDGER_DIR`, else ~/.cache/hf_fedlora/privacy_ledgers (override per node with ledger-dir)."""
    configured = os.environ.get("HF_FEDLORA_LEDGER_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "hf_fedlora" / "privacy_ledgers"


@dataclass
class PrivacyLedger:
    """One data set's privacy state. `client` is a `FederatedPrivacy.state_dict()` entry (None: nothing spent)."""

    path: Path
    data_key: str
    unit: str | None = None
    seeded: bool = False  # the streams were ever derived from a dp_secret_seed: say so on every card
    plan_id: str | None = None  # the run plan the current budget and noise belong to
    client: dict[str, Any] | None = None
    releases: list[dict[str, Any]] = field(default_factory=list)  # one entry per release, with its noise state hash

    @classmethod
    def open(cls, directory: str | os.PathLike, key: str) -> PrivacyLedger:
        """The ledger of the data with this key in `directory` (an empty one if these data never spent any)."""
        path = Path(directory) / f"{key}.json"
        if not path.exists():
            return cls(path=path, data_key=key)
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
        if stored.get("version") != LEDGER_VERSION or stored.get("data_key") != key:
            raise ValueError(
                f"{path} is not a version-{LEDGER_VERSION} privacy ledger for data {key[:12]}...: move it away only "
                "if these data never trained under this ledger (their spent privacy would be forgotten)"
            )
        client = stored.get("client")
        return cls(
            path=path,
            data_key=key,
            unit=stored.get("unit"),
            seeded=bool(stored.get("seeded")),
            plan_id=stored.get("plan_id"),
            client=client,
            releases=list(stored.get("releases") or []),
        )

    @property
    def history(self) -> list[list[float]]:
        """(noise multiplier, sample rate, steps) entries spent on these data so far, every run included."""
        return [list(entry) for entry in (self.client or {}).get("history", [])]

    def save(self) -> None:
        """Write atomically: a crash leaves the old ledger or the new one, never a torn file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stored = {
            "version": LEDGER_VERSION,
            "data_key": self.data_key,
            "unit": self.unit,
            "seeded": self.seeded,
            "plan_id": self.plan_id,
            "client": self.client,  # FederatedPrivacy.client_state(): JSON-safe, RNG states in base64
            "releases": self.releases,
        }
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(stored, file, indent=1)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise


def generator_fingerprint(state: torch.Tensor) -> str:
    """A short hash of a generator state: enough to show two releases never drew from the same point."""
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()[:16]
