"""What every DP mechanism here shares: its budget (a target epsilon, or a noise multiplier set directly), its
clipping, its accountant, and where its randomness comes from.

The random streams the guarantee rests on (Poisson sampling of examples or clients, and the noise) come from OS
entropy, never from the run's published seed: anyone who knows their root can rebuild every batch and subtract the
noise. A secret seed makes them reproducible for experiments (reports then say the guarantee holds only while it
stays secret). Secure mode draws every batch and noise tensor from a generator seeded afresh by OS entropy, so no
state exists that could regenerate them.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import torch

from .dp_optimizer import CLIPPINGS


def derived_seed(seed: int, index: int, stream: int) -> int:
    """Independent seeds for independent streams (per client: batch sampling vs noise) from one secret root."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def mechanism_arguments(args: Any) -> dict[str, Any]:
    """What every mechanism takes from a run's `FederatedTrainingArguments`."""
    return {
        "target_epsilon": args.dp_target_epsilon,
        "target_delta": args.dp_target_delta,
        "noise_multiplier": args.dp_noise_multiplier,
        "clip_norm": args.dp_clip_norm,
        "clipping": args.dp_clipping,
        "accountant": args.dp_accountant,
        "secret_seed": args.dp_secret_seed,
        "secure_mode": args.dp_secure_mode,
    }


class DPMechanism:
    unit: str

    def __init__(
        self,
        *,
        target_epsilon: float | None,
        target_delta: float,
        noise_multiplier: float | None,
        clip_norm: float,
        clipping: str,
        accountant: str,
        secret_seed: int | None,
        secure_mode: bool,
    ):
        if clipping not in CLIPPINGS:
            raise ValueError(f"dp_clipping must be one of {list(CLIPPINGS)}, got {clipping!r}")
        if secure_mode and secret_seed is not None:
            raise ValueError("dp_secure_mode draws from OS entropy only: it cannot be combined with dp_secret_seed")
        self.target_epsilon = target_epsilon
        self.delta = target_delta
        self.fixed_noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.clipping = clipping
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self.seeded = secret_seed is not None
        self._secret_root = secret_seed if secret_seed is not None else secrets.randbits(63)

    @property
    def enabled(self) -> bool:
        return self.target_epsilon is not None or self.fixed_noise_multiplier is not None

    def _generator(self, persistent: torch.Generator | None, device: torch.device | str | None = None):
        """The stream to draw from: the persistent one, or under secure mode a fresh one from OS entropy."""
        if not self.secure_mode:
            return persistent
        return torch.Generator(device=device if device is not None else "cpu").manual_seed(secrets.randbits(63))
