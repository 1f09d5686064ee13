"""Privacy accountants (Opacus), by name, so every report can say which one produced its numbers."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import integrate
from scipy.special import erfc

from .fast_rdp import rdp_epsilon
from .opacus_compat import (
    Domain,
    IAccountant,
    OpacusPRVAccountant,
    PoissonSubsampledGaussianPRV,
    RDPAccountant,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)


class PRVAccountant(OpacusPRVAccountant):
    """Opacus's PRV accountant, with the RDP bound on its discretisation domain computed by `fast_rdp`.

    Same domain, hence the same epsilon, as Opacus (remark 5.6 of Gopi et al., as Opacus's
    `compute_safe_domain_size` and `_get_domain`). That bound was 95% of a PRV epsilon's time; with it vectorised a
    PRV epsilon is ~2-4x faster (measured on 12 planning-like histories).
    """

    def _get_dprv(self, eps_error, delta_error):
        """Opacus's `_get_dprv` line for line, with `ScalarMeanPRV` for the truncated PRVs."""
        prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in self.history]
        num_self_compositions = [steps for _, _, steps in self.history]
        domain = self._get_domain(prvs, num_self_compositions, eps_error, delta_error)
        dprvs = [discretize(ScalarMeanPRV(prv, domain.t_min, domain.t_max), domain) for prv in prvs]
        return compose_heterogeneous(dprvs=dprvs, num_self_compositions=num_self_compositions)

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


class ScalarMeanPRV(TruncatedPrivacyRandomVariable):
    """Opacus's truncated PRV whose `mean()` (scipy `quad`, ~1,400 scalar cdf calls per PRV) evaluates the same
    cdf formula on Python floats instead of 0-d numpy arrays: ~10x faster, the same integral (tested equal to
    Opacus's epsilon). The mean was ~90% of a PRV epsilon's time after `fast_rdp`."""

    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        super().__init__(prv, t_min, t_max)
        q = prv.sample_rate
        with np.errstate(divide="ignore"):
            self._threshold = float(np.log(1 - q))  # -inf when q = 1
        self._cdf_t_min = float(prv.cdf(t_min))
        self._mass = float(self._remaining_mass)

    def _scalar_prv_cdf(self, t: float) -> float:
        if not t > self._threshold:
            return 0.0
        q, sigma = self._prv.sample_rate, self._prv.noise_multiplier
        exp_t = math.exp(t) if t < 709.0 else float(np.exp(t))  # numpy's inf, not OverflowError
        ratio = (exp_t + q - 1) / q  # rounding can leave it <= 0 just above the threshold; as numpy does:
        z = math.log(ratio) if ratio > 0 else (-math.inf if ratio == 0 else math.nan)
        scale = 2 * math.sqrt(2) * sigma
        return (
            -q * float(erfc((2 * z * sigma**2 - 1) / scale)) / 2
            - (1 - q) * float(erfc((2 * z * sigma**2 + 1) / scale)) / 2
            + 1.0
        )

    def _scalar_cdf(self, t: float) -> float:
        if t < self.t_min:
            return 0.0
        if t < self.t_max:
            return (self._scalar_prv_cdf(t) - self._cdf_t_min) / self._mass
        return 1.0

    def mean(self) -> float:
        """Opacus's `TruncatedPrivacyRandomVariable.mean`, integrating the scalar cdf."""
        lower_exponent = int(np.log10(np.abs(self.t_min)))
        upper_exponent = int(np.log10(self.t_max))
        points = np.concatenate(
            [
                [self.t_min],
                -np.logspace(start=lower_exponent, stop=-5, num=10),
                [0],
                np.logspace(start=-5, stop=upper_exponent, num=10),
                [self.t_max],
            ]
        )
        mean = 0.0
        for left, right in zip(points[:-1], points[1:], strict=False):
            integral, _ = integrate.quad(self._scalar_cdf, left, right, limit=500)
            mean += right * self.cdf(right) - left * self.cdf(left) - integral
        return mean


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
    # At q = 1 (no subsampling: client-level DP with every client) Opacus's PRV evaluates log(1 - q) = log(0) in a
    # branch np.where then discards; silence that warning, not the result.
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(fresh.get_epsilon(delta=delta))
