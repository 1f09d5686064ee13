"""Distributed noise for client-level DP: the distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021).

With secure aggregation the aggregator learns only the sum of the clients' uploads, so it cannot add the noise:
each client adds its share. Shares of continuous Gaussian noise would not survive a secure sum, which works on
integers modulo 2^bits. So each client, on its clipped round update x (norm <= C):

1. flattens it and pads it to D = a power of two (the same D for every release of the run);
2. rotates it, x -> H diag(s) x (H the normalised Walsh-Hadamard matrix, s random signs from the run's public
   seed), which spreads its norm over all coordinates so that the sum rarely wraps around the modulus;
3. scales it by 1/gamma (the granularity) and rounds it stochastically to integers, re-drawn until its norm is
   within the bound the accounting uses (conditional randomised rounding, beta);
4. adds discrete Gaussian noise N_Z(0, s^2) per coordinate, from its own secret randomness;
5. reduces it modulo 2^bits.

The secure sum adds the uploads modulo 2^bits; the aggregator maps the sum back to signed integers, multiplies by
gamma and rotates back. The sum of k >= n_min shares is accounted by the paper's Renyi-DP bound for the sum of
discrete Gaussians (its Proposition 14 with Theorem 1's tau), with the sensitivity inflated by the rounding, for
every number of surviving shares from the planned minimum n_min to all clients: clients that drop out add no
noise, and the plan never counts on them. See docs/algorithms.md#distributed-noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..federation.secure_mean import ENCODED
from .calibration import smallest_noise_multiplier
from .mechanism import derived_seed

RDP_ORDERS = tuple(np.concatenate([np.linspace(1.05, 10.95, 100), np.arange(11, 257, dtype=float)]))
BETA = math.exp(-0.5)  # conditional rounding: each try fails the norm bound with probability at most beta
K_STDDEVS = 4.0  # the modulus holds this many standard deviations of a coordinate of the noisy sum
ROTATION_STREAM = 5


# --- the accounting ---------------------------------------------------------------------------------------------
def rounded_l2_bound(scaled_norm: float, dimension: int, beta: float = BETA) -> float:
    """The norm bound after conditional randomised rounding of a vector of norm `scaled_norm` (paper's Theorem 1)."""
    bound = scaled_norm + math.sqrt(dimension)
    if beta <= 0:
        return bound
    squared = (
        scaled_norm**2 + dimension / 4 + math.sqrt(2 * math.log(1 / beta)) * (scaled_norm + math.sqrt(dimension) / 2)
    )
    return min(bound, math.sqrt(squared))


def tau(share_std: float, shares: int) -> float:
    """How far a sum of `shares` discrete Gaussians N_Z(0, share_std^2) is from one discrete Gaussian (Theorem 1)."""
    return 10 * sum(math.exp(-2 * (math.pi * share_std) ** 2 * k / (k + 1)) for k in range(1, shares))


def sum_rdp(orders: Sequence[float], l2_sensitivity: float, sum_std: float, share_std: float, shares: int, dim: int):
    """Renyi DP of one release of the sum of `shares` discrete Gaussian shares (integer units; Proposition 14)."""
    t = tau(share_std, shares)
    l2 = l2_sensitivity / sum_std
    l1 = l2_sensitivity * min(math.sqrt(dim), l2_sensitivity) / sum_std  # integers: L1 <= min(sqrt(D) L2, L2^2)
    orders = np.asarray(orders, dtype=float)
    return np.minimum.reduce(
        [
            orders / 2 * l2**2 + t * dim,
            orders / 2 * (l2**2 + 2 * l1 * t + t**2 * dim),
            orders / 2 * (l2 + math.sqrt(dim) * t) ** 2,
        ]
    )


def epsilon_from_rdp(orders: Sequence[float], rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from Renyi DP (Balle et al. 2020, Theorem 21; the conversion Opacus and dp_accounting use)."""
    orders = np.asarray(orders, dtype=float)
    epsilons = rdp + np.log1p(-1 / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    return float(max(0.0, np.nanmin(epsilons)))


@dataclass(frozen=True)
class DistributedNoisePlan:
    """Everything a client needs to encode its update and the aggregator to decode and account the sum; public."""

    noise_multiplier: float  # the sum of n_min shares has std noise_multiplier x C per release (float units)
    clip_norm: float
    dimension: int  # D, a power of two
    bits: int
    granularity: float  # gamma
    min_shares: int  # n_min: the fewest surviving clients whose shares a released sum may hold
    max_shares: int  # every client
    releases_per_round: int = 1
    sensitivity_factor: float = 1.0  # 2 under replace_one
    beta: float = BETA

    @property
    def modulus(self) -> int:
        return 2**self.bits

    @property
    def release_std(self) -> float:
        """Std of one release's noise in a sum of n_min shares, float units: sigma sqrt(R) C, as central DP-FedAvg."""
        return self.noise_multiplier * math.sqrt(self.releases_per_round) * self.clip_norm

    @property
    def share_std(self) -> float:
        """Each client's discrete Gaussian parameter, integer units."""
        return self.release_std / math.sqrt(self.min_shares) / self.granularity

    def rdp_per_round(self, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
        """One round's Renyi DP: its releases composed, the worst over every number of surviving shares."""
        sensitivity = self.sensitivity_factor * rounded_l2_bound(
            self.clip_norm / self.granularity, self.dimension, self.beta
        )
        worst = np.zeros(len(orders))
        for shares in range(self.min_shares, self.max_shares + 1):
            sum_std = self.share_std * math.sqrt(shares)
            rdp = sum_rdp(orders, sensitivity, sum_std, self.share_std, shares, self.dimension)
            worst = np.maximum(worst, rdp)
        return self.releases_per_round * worst

    def epsilon(self, rounds: int, delta: float) -> float:
        if rounds == 0:
            return 0.0
        return epsilon_from_rdp(RDP_ORDERS, rounds * self.rdp_per_round(), delta)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DistributedNoisePlan:
        return cls(**values)


def padded_dimension(size: int) -> int:
    return 1 << max(0, (int(size) - 1).bit_length())


def granularity_for(
    noise_multiplier: float,
    clip_norm: float,
    dimension: int,
    bits: int,
    clients: int,
    min_shares: int,
    releases_per_round: int,
) -> float:
    """gamma such that K_STDDEVS standard deviations of a coordinate of the noisy sum of every client fit in the
    modulus (the paper's Section 4.4, rho = 1); a larger modulus gives a finer grid."""
    share_std = noise_multiplier * math.sqrt(releases_per_round) * clip_norm / math.sqrt(min_shares)
    room = 2.0 ** (2 * bits) - clients * K_STDDEVS**2
    if room <= 0:
        raise ValueError(f"secure_sum_bits={bits} is too few for {clients} clients")
    spread = 2 * K_STDDEVS * math.sqrt(clip_norm**2 * clients**2 / dimension + clients * share_std**2)
    return spread / math.sqrt(room)


def plan_distributed_noise(
    *,
    target_epsilon: float | None,
    noise_multiplier: float | None,
    delta: float,
    clip_norm: float,
    upload_size: int,
    bits: int,
    clients: int,
    min_shares: int,
    rounds: int,
    releases_per_round: int,
    sensitivity_factor: float,
) -> DistributedNoisePlan:
    """The plan for `rounds` rounds: sigma calibrated so the accounted epsilon meets the target (or sigma given), and
    gamma sized to the modulus for that sigma (recomputed with sigma until both agree)."""
    dimension = padded_dimension(upload_size)

    def plan(sigma: float) -> DistributedNoisePlan:
        gamma = granularity_for(sigma, clip_norm, dimension, bits, clients, min_shares, releases_per_round)
        return DistributedNoisePlan(
            sigma, clip_norm, dimension, bits, gamma, min_shares, clients, releases_per_round, sensitivity_factor
        )

    if noise_multiplier is not None:
        return plan(float(noise_multiplier))
    try:
        sigma = smallest_noise_multiplier(lambda s: plan(s).epsilon(rounds, delta), target_epsilon, tolerance=1e-3)
    except ValueError as error:
        raise ValueError(
            f"dp_target_epsilon={target_epsilon} cannot be reached with distributed noise: {error}"
        ) from error
    chosen = plan(sigma)
    if chosen.epsilon(rounds, delta) > target_epsilon:  # never hand out a plan that overspends
        raise ValueError(f"no distributed-noise plan meets dp_target_epsilon={target_epsilon} at {bits} bits")
    return chosen


# --- the encoding -----------------------------------------------------------------------------------------------
def hadamard(vector: torch.Tensor) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform of a vector of length 2^k (orthogonal and its own inverse)."""
    size = vector.numel()
    out, half = vector.reshape(size), 1
    while half < size:
        pairs = out.view(-1, 2, half)
        out = torch.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), dim=1).reshape(size)
        half *= 2
    return out / math.sqrt(size)


def rotation_signs(public_seed: int, round_index: int, sub_round: int, dimension: int) -> torch.Tensor:
    """The release's random signs: public (from the run's seed), the same for every client and the aggregator."""
    generator = torch.Generator().manual_seed(
        derived_seed(public_seed, round_index * 1000 + sub_round, ROTATION_STREAM)
    )
    return torch.randint(0, 2, (dimension,), generator=generator, dtype=torch.float64) * 2 - 1


def sample_discrete_gaussian(std: float, size: int, generator: torch.Generator | None) -> torch.Tensor:
    """N_Z(0, std^2) by rejection from the discrete Laplace (Canonne, Kamath and Steinke 2020, Algorithm 3), in
    float64 arithmetic; int64."""
    if std <= 0:
        return torch.zeros(size, dtype=torch.int64)
    t = math.floor(std) + 1
    out = torch.empty(size, dtype=torch.int64)
    missing = torch.arange(size)
    while missing.numel():
        n = missing.numel()
        uniforms = torch.rand(3, n, generator=generator, dtype=torch.float64).clamp_min(1e-300)
        geometric = torch.floor(-t * torch.log(uniforms[:2]))  # two Geometric(1 - e^(-1/t)) draws
        laplace = geometric[0] - geometric[1]
        accept = uniforms[2] < torch.exp(-((laplace.abs() - std**2 / t) ** 2) / (2 * std**2))
        out[missing[accept]] = laplace[accept].to(torch.int64)
        missing = missing[~accept]
    return out


def flatten(update: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([update[key].detach().reshape(-1).double().cpu() for key in keys])


def encode(
    update: Mapping[str, torch.Tensor],
    plan: DistributedNoisePlan,
    signs: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One client's upload: its clipped update rotated, scaled, rounded within the bound, plus its noise share,
    modulo 2^bits (int64 in [0, 2^bits))."""
    vector = flatten(update, sorted(update))
    if vector.numel() > plan.dimension:
        raise ValueError(f"an update of {vector.numel()} numbers does not fit the plan's dimension {plan.dimension}")
    norm = float(vector.norm())
    if norm > plan.clip_norm * (1 + 1e-6):
        raise ValueError(f"the update's norm {norm:.4g} is above the clip norm {plan.clip_norm}")
    if norm > plan.clip_norm * (1 - 1e-12):  # float32 clipping can leave it a hair above C: the bound needs <= C
        vector = vector * (plan.clip_norm * (1 - 1e-12) / norm)
    padded = torch.zeros(plan.dimension, dtype=torch.float64)
    padded[: vector.numel()] = vector
    scaled = hadamard(signs * padded) / plan.granularity
    bound = rounded_l2_bound(plan.clip_norm / plan.granularity, plan.dimension, plan.beta)
    floor = torch.floor(scaled)
    for _ in range(1000):
        rounded = floor + (torch.rand(plan.dimension, generator=generator, dtype=torch.float64) < scaled - floor)
        if float(rounded.norm()) <= bound:
            break
    else:
        raise RuntimeError("conditional rounding did not meet its norm bound in 1000 tries")
    noisy = rounded.to(torch.int64) + sample_discrete_gaussian(plan.share_std, plan.dimension, generator)
    return torch.remainder(noisy, plan.modulus)


def decode(
    total: torch.Tensor, plan: DistributedNoisePlan, signs: torch.Tensor, shapes: Mapping[str, Sequence[int]]
) -> dict[str, torch.Tensor]:
    """The float sum from the modular sum of the uploads: signed, times gamma, rotated back, unpadded, reshaped."""
    modulus = plan.modulus
    signed = torch.remainder(total.to(torch.int64) + modulus // 2, modulus) - modulus // 2
    vector = signs * hadamard(signed.double() * plan.granularity)
    out, start = {}, 0
    for key in sorted(shapes):
        count = math.prod(shapes[key])
        out[key] = vector[start : start + count].reshape(tuple(shapes[key])).float()
        start += count
    return out


def client_encoder(
    plan: DistributedNoisePlan,
    public_seed: int,
    secret_seed: int | None,
    client_index: int,
    round_index: int,
    sub_round: int,
):
    """What one client applies to its clipped update in this (sub-)round: `{ENCODED: encode(...)}`. Its rounding
    and noise come from its own secret stream: OS entropy, or derived from a secret seed (reproducible runs)."""
    if secret_seed is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    else:
        seed = derived_seed(secret_seed, client_index, 1000 * round_index + sub_round + 7)
        generator = torch.Generator().manual_seed(seed)
    signs = rotation_signs(public_seed, round_index, sub_round, plan.dimension)
    return lambda update: {ENCODED: encode(update, plan, signs, generator)}
