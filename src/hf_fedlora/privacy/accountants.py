"""Privacy accountants (Opacus), by name, so every report can say which one produced its numbers."""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"dp_accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")
    return ACCOUNTANTS[name]()


def epsilon_from_history(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon of a (noise multiplier, sample rate, steps) history; 0 when nothing ran."""
    if not history:
        return 0.0
    fresh = make_accountant(accountant)
    fresh.history = [tuple(entry) for entry in history]
    return float(fresh.get_epsilon(delta=delta))
