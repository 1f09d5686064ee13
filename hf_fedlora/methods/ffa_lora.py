"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared seeded init, only B trains and is sent.

With every client holding the same A, averaging B is exactly averaging the clients'
updates (aggregation deviation zero), the DP noise lands on B alone (no noise-times-noise
term), and the LoRA upload is half of LoRA's (a task head is sent in full by both).
Changing lora_alpha only rescales B's learning rate, so FFA-LoRA wants a larger
learning rate than LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..federation.adapter_state import HEAD, LORA_B
from .base import FederatedMethod
from .lora import FedLoraConfig


class FFALoraMethod(FederatedMethod):
    name = "ffa_lora"

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        return frozenset({LORA_B})

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        return frozenset({LORA_B, HEAD})


@dataclass
class FFALoraConfig(FedLoraConfig):
    """`FedLoraConfig` for FFA-LoRA: lora_A frozen at its shared init (from `init_seed`), only lora_B trains."""

    method_class: ClassVar[type[FederatedMethod]] = FFALoraMethod
