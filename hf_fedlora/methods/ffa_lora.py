"""FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared seeded init, only B trains and is sent.

With every client holding the same A, averaging B is exactly averaging the clients'
updates (aggregation deviation zero), the DP noise lands on B alone (no noise-times-noise
term), and the LoRA upload is half of LoRA's (a task head is sent in full by both).
Changing lora_alpha only rescales B's learning rate, so FFA-LoRA wants a larger
learning rate than LoRA. `lr_ratio_b` sets B's rate apart from the head's: the head is a few thousand
weights reading a good feature, B is tens of thousands, each step's DP noise spread over all of them, so B
moving slower than the head can win (benchmarks/RESULTS.md#head-input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..federation.adapter_state import HEAD, LORA_B
from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod
from .lora import FedLoraConfig, check_learning_rate_ratio


class FFALoraMethod(FederatedMethod):
    name = "ffa_lora"
    display_name = "FFA-LoRA"
    description = (
        "A is frozen at a shared seeded init on every client; only B is trained, uploaded and averaged, so "
        "averaging B is exactly averaging the clients' updates, and the LoRA part of the upload is half of LoRA's "
        "(a task head, if any, is sent in full by both)."
    )
    citation = """@inproceedings{sun2024improving,
  title     = {Improving {LoRA} in Privacy-preserving Federated Learning},
  author    = {Sun, Youbang and Li, Zitao and Li, Yaliang and Ding, Bolin},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024}
}"""
    # B trains alone and lora_alpha only rescales B's rate, so FFA-LoRA needs a larger rate than LoRA
    # (docs/algorithms.md#ffa-lora); the recipe trains B at a tenth of it: val. acc. 0.677 over 0.651 at one rate,
    # three seeds; test 0.676 over 0.628 (benchmarks/RESULTS.md#head-input).
    recipe_learning_rate = DefaultLearningRate(
        5e-2,
        RECIPE_SWEEP
        + ", lora_B at 0.1x: 5e-2 (val. acc. 0.686; 0.677 over three seeds); benchmarks/RESULTS.md#head-input",
    )
    recipe_settings = {"lr_ratio_b": 0.1}

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
