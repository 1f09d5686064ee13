"""Privacy accountants (Opacus), by name, so every report can say which one produced its numbers."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"dp_accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name]()


def epsilon_from_history(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a (noise multiplier, sample rate, steps) history; 0 when nothing ran.

    A fresh accountant fed only the recorded history, so the number is exactly what anyone can re-derive.
    """
    return _epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """Cached: PRV takes ~0.1-1 s, and the same history is asked for at every round's log and in reports."""
    if not history:
        return 0.0
    fresh = make_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))
