"""Privacy accountants (Opacus), by name, so every report can say which one produced its numbers."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants import IAccountant, RDPAccountant
from opacus.accountants import PRVAccountant as OpacusPRVAccountant
from opacus.accountants.analysis.prv import Domain

from .fast_rdp import rdp_epsilon


class PRVAccountant(OpacusPRVAccountant):
    """Opacus's PRV accountant, with the RDP bound on its discretisation domain computed by `fast_rdp`.

    Same domain, hence the same epsilon, as Opacus (remark 5.6 of Gopi et al., as Opacus's
    `compute_safe_domain_size` and `_get_domain`). That bound was 95% of a PRV epsilon's time; with it vectorised a
    PRV epsilon is ~2-4x faster (measured on 12 planning-like histories).
    """

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error) -> Domain:
        total = sum(num_self_compositions)
        orders = RDPAccountant.DEFAULT_ALPHAS
        histories = [
            (prv.noise_multiplier, prv.sample_rate, n) for prv, n in zip(prvs, num_self_compositions, strict=True)
        ]
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": the bound is then looser, so the domain only grows (safe).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            bound = rdp_epsilon(histories, delta_error / 4, orders)
            for sigma, q, _ in histories:
                bound = max(bound, rdp_epsilon([(sigma, q, 1)], delta_error / (8 * total), orders))
        size = max(bound, eps_error) + 3
        mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
        return Domain.create_aligned(-size, size, mesh_size)


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
