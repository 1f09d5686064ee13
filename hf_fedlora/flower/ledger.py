"""A client's privacy ledger on its own disk: what its examples have spent, and where its secret streams stand.

Under Flower a ClientApp runs in a fresh process per message and `context.state` lives in the SuperNode's memory
for one run: privacy state kept there would be lost on a restart, or worse, a re-derived noise stream would repeat.
So each client keeps one JSON ledger per data set (keyed by a hash of its examples, not by the run) in a private
folder: its accountant state (this run's steps, what its examples spent before), its noise multiplier and step
budget, the states of its secret Poisson sampler and noise generator, and a digest of each example it holds. It is
written atomically (temp file, fsync, `os.replace`, owner-only) BEFORE anything computed from those streams leaves
the client.

Composition is per example: a client that plans finds every ledger in its folder that holds any of its examples (by
digest); an example's earlier spend is the composition of the steps that every ledger holding it ran on it (each
ledger's own steps, so no run is counted twice), and the client answers for the worst over its examples. Re-split
data, or data with one example added, never start from a fresh budget.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset

from ..atomic_json import write_json_atomically

LEDGER_VERSION = 2


def data_key(dataset: Dataset) -> str:
    """A hash of the client's examples (content, order and schema): the same data always find the same ledger,
    whatever run, node id or partition id they come with."""
    table = dataset.with_format("arrow")[:]
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def example_digests(dataset: Dataset) -> list[str]:
    """A digest of each example's content (every column, canonical JSON), to find the same example in another
    ledger. Private: ledgers stay on the client's disk."""
    table = dataset.with_format("arrow")[:]
    rows = table.to_pylist()
    return [
        hashlib.blake2b(json.dumps(row, sort_keys=True, default=_encode).encode(), digest_size=16).hexdigest()
        for row in rows
    ]


def _encode(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


def default_ledger_dir() -> Path:
    """`$HF_FEDLORA_LEDGER_DIR`, else ~/.cache/hf_fedlora/privacy_ledgers (override per node with ledger-dir)."""
    configured = os.environ.get("HF_FEDLORA_LEDGER_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "hf_fedlora" / "privacy_ledgers"


@dataclass
class PrivacyLedger:
    """One data set's privacy state. `client` is a `FederatedPrivacy.client_state()` (None: nothing spent yet)."""

    path: Path
    data_key: str
    unit: str | None = None
    seeded: bool = False  # the streams were ever derived from a dp_secret_seed: say so on every card
    plan_id: str | None = None  # the run plan the current budget and noise belong to
    client: dict[str, Any] | None = None  # the current plan's engine state (this plan's own steps, RNG states)
    past_own: list[list[float]] = field(default_factory=list)  # steps these data ran under earlier plans
    spent: list[list[float]] = field(default_factory=list)  # the total history its examples answer for (reported)
    digests: list[str] = field(default_factory=list)
    releases: list[dict[str, Any]] = field(default_factory=list)  # one entry per release, with its noise state hash

    @classmethod
    def open(cls, directory: str | os.PathLike, key: str) -> PrivacyLedger:
        """The ledger of the data with this key in `directory` (an empty one if these data never spent any)."""
        path = Path(directory) / f"{key}.json"
        if not path.exists():
            return cls(path=path, data_key=key)
        stored = _read(path)
        if stored.get("version") != LEDGER_VERSION or stored.get("data_key") != key:
            raise ValueError(
                f"{path} is not a version-{LEDGER_VERSION} privacy ledger for data {key[:12]}...: move it away only "
                "if these data never trained under this ledger (their spent privacy would be forgotten)"
            )
        return cls(
            path=path,
            data_key=key,
            unit=stored.get("unit"),
            seeded=bool(stored.get("seeded")),
            plan_id=stored.get("plan_id"),
            client=stored.get("client"),
            past_own=list(stored.get("past_own") or []),
            spent=list(stored.get("spent") or []),
            digests=list(stored.get("digests") or []),
            releases=list(stored.get("releases") or []),
        )

    @property
    def own(self) -> list[list[float]]:
        """Every step these data ran, under every plan: what an example of them spent here."""
        current = (self.client or {}).get("history") or []
        return [list(entry) for entry in self.past_own] + [list(entry) for entry in current]

    @property
    def history(self) -> list[list[float]]:
        """(noise multiplier, sample rate, steps) entries its examples answer for, every run included."""
        return [list(entry) for entry in self.spent]

    def save(self) -> None:
        """Written atomically, owner-only: a crash leaves the old ledger or the new one, never a torn file."""
        stored = {
            "version": LEDGER_VERSION,
            "data_key": self.data_key,
            "unit": self.unit,
            "seeded": self.seeded,
            "plan_id": self.plan_id,
            "client": self.client,  # FederatedPrivacy.client_state(): JSON-safe, RNG states in base64
            "past_own": self.past_own,
            "own": self.own,
            "spent": self.spent,
            "digests": self.digests,
            "releases": self.releases,
        }
        write_json_atomically(self.path, stored, indent=1, private=True)


def prior_candidates(directory: str | os.PathLike, digests: list[str]) -> tuple[list[list[list[float]]], bool]:
    """What the examples with these digests spent in the ledgers of `directory`: one candidate history per distinct
    set of ledgers holding an example (the steps each of them ran, composed), and whether any was seeded."""
    wanted = set(digests)
    holders: dict[str, list[str]] = defaultdict(list)
    spent: dict[str, list[list[float]]] = {}
    seeded = False
    folder = Path(directory)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        stored = _read(path)
        if stored.get("version") != LEDGER_VERSION or not stored.get("own"):
            continue
        overlap = wanted.intersection(stored.get("digests") or [])
        if not overlap:
            continue
        spent[path.name] = stored["own"]
        seeded = seeded or bool(stored.get("seeded"))
        for digest in overlap:
            holders[digest].append(path.name)
    groups = {tuple(sorted(names)) for names in holders.values()}
    candidates = [[entry for name in group for entry in spent[name]] for group in sorted(groups)]
    return candidates, seeded


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def generator_fingerprint(state: torch.Tensor) -> str:
    """A short hash of a generator state: enough to show two releases never drew from the same point."""
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()[:16]
