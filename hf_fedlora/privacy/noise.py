"""The Gaussian noise of every DP release: isotropic, or shaped by DEeR's regulator; optionally secure.

Both mechanisms use it: DP-SGD inside a client (unit one example) and DP-FedAvg at the aggregator (unit one client).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..federation.adapter_state import LORA_A, LORA_B, factor_of, peer_name
from .noise_regulator import regulated_noise


def draw_noise(
    key: str,
    shape: Sequence[int],
    peers: Mapping[str, torch.Tensor],
    std: float,
    generator: torch.Generator | None,
    regulate: bool,
    secure: bool = False,
) -> torch.Tensor:
    """Noise for the released tensor `key`: N(0, std^2 I), or for a LoRA factor under DEeR's regulator shaped by its
    peer in `peers` (covariance never below std^2 I, so the accounting holds).

    `secure`: robust to floating-point attacks on the Gaussian sampler (Mironov 2012), as Opacus's secure_mode: one
    draw discarded, then the sum of four draws divided by two (the same covariance; Holohan et al. 2021).
    """
    if not secure:
        return _draw(key, shape, peers, std, generator, regulate)
    _draw(key, shape, peers, std, generator, regulate)  # discarded
    return sum(_draw(key, shape, peers, std, generator, regulate) for _ in range(4)) / 2


def _draw(key, shape, peers, std, generator, regulate) -> torch.Tensor:
    factor, peer = factor_of(key), peer_name(key)
    if regulate and factor in (LORA_A, LORA_B) and peer in peers:
        return regulated_noise(factor, peers[peer].detach(), shape, std, generator)
    reference = peers[key] if key in peers else None
    device = reference.device if reference is not None else None
    return torch.normal(0.0, std, size=tuple(shape), generator=generator, device=device)
