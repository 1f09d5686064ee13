"""RoLoRA (Chen et al., 2024): alternate the trained LoRA factor from one round to the next.

Round 1 (round_index 0) every client trains B with the shared A frozen, round 2 trains A
with the shared B frozen, and so on. Every client holds the same frozen factor during a
round, so averaging the trained one is exactly averaging the clients' updates
(aggregation deviation zero), and only the trained factor (plus the head) is sent. B goes
first because B starts at zero: an A-first round would have a zero gradient on A.
RoLoRA has no noise regulator: under DP its noise is the plain isotropic DP-SGD noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..federation.adapter_state import HEAD, LORA_A, LORA_B
from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod
from .lora import FedLoraConfig


def rolora_factor(round_index: int) -> str:
    """The LoRA factor trained in a round: B in odd rounds (1, 3, ...: round_index 0, 2, ...), A in even ones."""
    return LORA_B if round_index % 2 == 0 else LORA_A


class RoLoraMethod(FederatedMethod):
    name = "rolora"
    display_name = "RoLoRA"
    description = (
        "B trains in odd rounds and A in even rounds, the other factor frozen; only the trained factor is "
        "uploaded and averaged."
    )
    citation = """@article{chen2024rolora,
  title   = {Robust Federated Finetuning of Foundation Models via Alternating Minimization of {LoRA}},
  author  = {Chen, Shuangyi and Ju, Yue and Dalal, Hardik and Zhu, Zhongwen and Khisti, Ashish},
  journal = {arXiv preprint arXiv:2409.02346},
  year    = {2024}
}"""
    recipe_learning_rate = DefaultLearningRate(2e-2, RECIPE_SWEEP + ": 2e-2 (val. acc. 0.658) over 5e-2 (0.388)")

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        return frozenset({rolora_factor(round_index)})

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        return frozenset({rolora_factor(round_index), HEAD})


@dataclass
class RoLoraConfig(FedLoraConfig):
    """`FedLoraConfig` for RoLoRA: B trains in odd rounds (A frozen), A in even rounds (B frozen)."""

    method_class: ClassVar[type[FederatedMethod]] = RoLoraMethod
