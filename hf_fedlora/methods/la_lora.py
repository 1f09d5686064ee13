"""LA-LoRA: A and B alternate every local step (B first), both are uploaded and averaged.

Inside a round, local step s trains B when (s // alternate_every) is even and A when it is
odd, so only one factor (plus the head) moves at a time and the DP noise of a step lands on
that factor alone. B goes first because it starts at zero: an A-first step would have a zero
gradient. Both factors drift on every client, so the server's separate averages of A and B
do not give zero aggregation deviation (unlike FFA-LoRA or DEeR). The privacy layer applies
a fixed low-pass filter to the noisy gradient (post-processing: it costs no privacy); this
method only names it. The project follows the paper, not the released code (docs/algorithms.md#la-lora).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..federation.adapter_state import LORA_A, LORA_B
from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod
from .lora import FedLoraConfig, check_learning_rate_ratio

LOWPASS_FILTER = "binomial_lowpass"  # a key of privacy.postprocessing.NOISY_GRADIENT_FILTERS


class LALoraMethod(FederatedMethod):
    name = "la_lora"
    display_name = "LA-LoRA"
    description = (
        "A and B train alternately at every local step, B first; both are uploaded and averaged separately. "
        "Under DP the noisy gradient of the trained factor is smoothed along its feature axis by a fixed low-pass "
        "filter (post-processing: it costs no privacy)."
    )
    citation = """@inproceedings{liu2026rethinking,
  title     = {Rethinking {LoRA} for Privacy-Preserving Federated Learning in Large Models},
  author    = {Liu, Jin and Miao, Yinbin and Xi, Ning and Liu, Junkang},
  booktitle = {The Fourteenth International Conference on Learning Representations (ICLR)},
  year      = {2026},
  note      = {arXiv:2602.19926}
}"""
    recipe_learning_rate = DefaultLearningRate(5e-2, RECIPE_SWEEP + ": 5e-2 (val. acc. 0.656) over 2e-2 (0.646)")

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        """B on even phases, A on odd ones; a phase is `alternate_every` local steps, counted from 0 each round."""
        phase = step // self.config.alternate_every
        return frozenset({LORA_B}) if phase % 2 == 0 else frozenset({LORA_A})

    def noisy_gradient_filter(self) -> str | None:
        return LOWPASS_FILTER if self.config.lowpass_filter else None

    def learning_rate_scale(self, factor: str) -> float:
        """B's learning rate is `lr_ratio_b` times A's (and the head's)."""
        return float(self.config.lr_ratio_b) if factor == LORA_B else 1.0


@dataclass
class LALoraConfig(FedLoraConfig):
    """`FedLoraConfig` for LA-LoRA: A and B alternate every `alternate_every` local steps, B first."""

    alternate_every: int = field(
        default=1,
        metadata={
            "help": "Local steps per phase: step s trains lora_B when (s // alternate_every) is even and lora_A "
            "when it is odd (1: B, A, B, A, ...; 2: B, B, A, A, ...). Counted from 0 in every round."
        },
    )
    lr_ratio_b: float = field(
        default=1.0,
        metadata={
            "help": "Learning rate of lora_B divided by that of lora_A (and of the head). The paper's default is 1; "
            "the released LA-LoRA code uses 2."
        },
    )
    lowpass_filter: bool = field(
        default=True,
        metadata={
            "help": "Smooth each noisy gradient of the trained factor with the fixed binomial kernel "
            "[1, 4, 6, 4, 1] / 16 along its feature axis (post-processing after the DP noise: no privacy cost). "
            "False for the paper's ablation."
        },
    )

    method_class: ClassVar[type[FederatedMethod]] = LALoraMethod
    federated_fields: ClassVar[tuple[str, ...]] = (
        *FedLoraConfig.federated_fields,
        "alternate_every",
        "lr_ratio_b",
        "lowpass_filter",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        every = self.alternate_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"alternate_every must be a positive integer (local steps per phase), got {every!r}")
        check_learning_rate_ratio("lr_ratio_b", self.lr_ratio_b)
        if not isinstance(self.lowpass_filter, bool):
            raise ValueError(f"lowpass_filter must be True or False, got {self.lowpass_filter!r}")
