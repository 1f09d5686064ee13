"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared seeded init, only B trains and is sent.

With every client holding the same A, averaging B is exactly averaging the clients'
updates (aggregation deviation zero), the DP noise lands on B alone (no noise-times-noise
term), and the LoRA upload is half of LoRA's (a task head is sent in full by both).
Changing lora_alpha only rescales B's learning rate, so FFA-LoRA wants a larger
learning rate than LoRA. `lr_ratio_b` sets B's rate apart from the head's: the head is a few thousand
weights reading a good feature, B is tens of thousands, each step's DP noise spread over all of them, so B
moving slower than the head can win (benchmarks/RESULTS.md, section 15).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..federation.adapter_state import HEAD, LORA_B
from .base import FederatedMethod
from .lora import FedLoraConfig, check_learning_rate_ratio


class FFALoraMethod(FederatedMethod):
    name = "ffa_lora"

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        return frozenset({LORA_B})

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        return frozenset({LORA_B, HEAD})

    def learning_rate_scale(self, factor: str) -> float:
        """B's learning rate is `lr_ratio_b` times the head's (the trainer's `learning_rate`)."""
        return float(self.config.lr_ratio_b) if factor == LORA_B else 1.0


@dataclass
class FFALoraConfig(FedLoraConfig):
    """`FedLoraConfig` for FFA-LoRA: lora_A frozen at its shared init (from `init_seed`), only lora_B trains."""

    lr_ratio_b: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of lora_B divided by that of the task head (the trainer's learning_rate). 1 is "
            "the paper's one rate; the demo's recipe uses 0.1 (chosen on validation tweets)."
        },
    )

    method_class: ClassVar[type[FederatedMethod]] = FFALoraMethod
    federated_fields: ClassVar[tuple[str, ...]] = (*FedLoraConfig.federated_fields, "lr_ratio_b")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_learning_rate_ratio("lr_ratio_b", self.lr_ratio_b)
