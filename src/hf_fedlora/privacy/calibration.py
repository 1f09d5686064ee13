"""Choosing the noise multiplier that just meets a target (epsilon, delta) before training."""

from __future__ import annotations

import functools

from opacus.accountants.utils import get_noise_multiplier

from .accountants import epsilon_from_history


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior_history: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """Smallest noise multiplier (to a search tolerance) whose epsilon after `steps` is <= target.

    `prior_history` is what the client already spent (an earlier run on the same data): the new
    steps must fit in what is left. Cached: clients with the same rate, steps and past share one search.
    """
    already = epsilon_from_history(prior_history, target_delta, accountant)
    if already >= target_epsilon:
        raise ValueError(
            f"dp_target_epsilon={target_epsilon} is already spent: the earlier training of this adapter on the "
            f"same client's data cost epsilon {already:.3f} (delta={target_delta}, {accountant}). Raise the target, "
            "or set dp_new_privacy_budget=True only if this run's data are disjoint from that run's."
        )
    try:
        if prior_history:
            sigma = _search_with_prior(target_epsilon, target_delta, sample_rate, steps, accountant, prior_history)
        else:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=target_delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
    except ValueError as error:
        raise ValueError(
            f"dp_target_epsilon={target_epsilon} with dp_target_delta={target_delta} cannot be reached at "
            f"sample rate {sample_rate:.4g} over {steps} steps ({accountant} accountant): {error}"
        ) from error
    spent = epsilon_from_history(list(prior_history) + [(sigma, sample_rate, steps)], target_delta, accountant)
    if spent > target_epsilon:  # the search is approximate; never hand out a sigma that overspends
        raise ValueError(
            f"calibration returned noise multiplier {sigma:.4g} whose epsilon {spent:.4f} exceeds "
            f"dp_target_epsilon={target_epsilon} (sample rate {sample_rate:.4g}, {steps} steps, {accountant})"
        )
    return float(sigma)


def _search_with_prior(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior_history: tuple[tuple[float, float, int], ...],
    tolerance: float = 0.01,
) -> float:
    """Bisection on sigma for epsilon(prior + new steps) <= target (epsilon falls as sigma grows)."""

    def epsilon(sigma: float) -> float:
        return epsilon_from_history(list(prior_history) + [(sigma, sample_rate, steps)], target_delta, accountant)

    low, high = 0.0, 10.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise ValueError("no noise multiplier below 1e6 meets the target")
    while high - low > tolerance:
        middle = (low + high) / 2
        if epsilon(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
