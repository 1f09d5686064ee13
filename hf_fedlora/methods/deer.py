"""DEeR (Zhu et al., 2024): deviation eliminator (alternating sub-rounds) and noise regulator.

Deviation eliminator: each round is two sub-rounds, each with its own local pass, upload
and aggregation: sub-round 0 trains B with A frozen, sub-round 1 trains A with B frozen
(B first: B starts at zero, so an A-first pass has zero gradient). With the peer frozen
at the same value on every client, averaging the trained factor is exactly averaging the
clients' updates, and each upload is the trained factor plus the head. Off, A and B train
jointly in one sub-round and both are uploaded, as DP-LoRA.

Noise regulator: under DP the noise on a trained LoRA factor is shaped by the current
value of its peer (`hf_fedlora.privacy.noise_regulator`); this method only asks for it.
Off, the noise is the plain isotropic DP-SGD noise. Both switches are the paper's
ablations and default to on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..federation.adapter_state import HEAD, LORA_A, LORA_B
from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod
from .lora import FedLoraConfig

SUB_ROUND_FACTORS = (LORA_B, LORA_A)  # sub-round 0 trains B, sub-round 1 trains A


class DeerMethod(FederatedMethod):
    name = "deer"
    display_name = "DEeR"
    description = (
        "Each round is two sub-rounds, first B (A frozen) then A (B frozen); only the trained factor is uploaded "
        "and averaged (under DP, with the noise regulator on, the noise on it is shaped by the frozen factor and "
        "scaled by that factor's largest singular value, so it is never below the nominal DP-SGD noise)."
    )
    citation = """@article{zhu2024deer,
  title   = {{DEeR}: Deviation Eliminating and Noise Regulating for Privacy-preserving Federated Low-rank Adaptation},
  author  = {Zhu, Meilu and Mao, Axiu and Liu, Jun and Yuan, Yixuan},
  journal = {arXiv preprint arXiv:2410.12926},
  year    = {2024}
}"""
    recipe_learning_rate = DefaultLearningRate(
        1e-2, RECIPE_SWEEP + ": 1e-2 (val. acc. 0.656) over 2e-2 (0.650) and 5e-2 (0.564)"
    )

    def num_sub_rounds(self, round_index: int) -> int:
        return len(SUB_ROUND_FACTORS) if self.config.deviation_eliminator else 1

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        if not self.config.deviation_eliminator:
            return frozenset({LORA_A, LORA_B})
        return frozenset({SUB_ROUND_FACTORS[sub_round]})

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        return self.trained_lora_factors(round_index, sub_round, 0) | {HEAD}

    def regulates_noise(self) -> bool:
        return self.config.noise_regulator


@dataclass
class DeerConfig(FedLoraConfig):
    """`FedLoraConfig` for DEeR, with the paper's two ablation switches (both on by default)."""

    deviation_eliminator: bool = field(
        default=True,
        metadata={
            "help": "On: each round is two sub-rounds, B (A frozen) then A (B frozen), each uploading only the "
            "trained factor and the head, so aggregation is exact. Off: A and B train jointly in one sub-round "
            "and both are uploaded, as DP-LoRA."
        },
    )
    noise_regulator: bool = field(
        default=True,
        metadata={
            "help": "On: under DP the noise on a trained LoRA factor is shaped by its frozen peer, scaled so it "
            "is never below the nominal noise in any direction. Off: plain isotropic DP-SGD noise."
        },
    )

    method_class: ClassVar[type[FederatedMethod]] = DeerMethod
    federated_fields: ClassVar[tuple[str, ...]] = FedLoraConfig.federated_fields + (
        "deviation_eliminator",
        "noise_regulator",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("deviation_eliminator", "noise_regulator"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
