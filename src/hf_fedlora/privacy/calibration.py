"""Choosing the noise multiplier that just meets a target (epsilon, delta) before training."""

from __future__ import annotations

import functools

from opacus.accountants.utils import get_noise_multiplier

from .accountants import epsilon_from_history


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    target_epsilon: float, target_delta: float, sample_rate: float, steps: int, accountant: str
) -> float:
    """Smallest noise multiplier (to Opacus's search tolerance) whose epsilon after `steps` is <= target.

    Cached: clients with the same sample rate and step count share one search.
    """
    try:
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
    spent = epsilon_from_history([(sigma, sample_rate, steps)], target_delta, accountant)
    if spent > target_epsilon:  # the search is approximate; never hand out a sigma that overspends
        raise ValueError(
            f"calibration returned noise multiplier {sigma:.4g} whose epsilon {spent:.4f} exceeds "
            f"dp_target_epsilon={target_epsilon} (sample rate {sample_rate:.4g}, {steps} steps, {accountant})"
        )
    return float(sigma)
