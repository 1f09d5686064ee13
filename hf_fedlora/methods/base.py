"""The contract between a federated LoRA method and the trainer.

The trainer never names a method: it asks the method object which factors train at a
given round, sub-round and local step, which factors a client uploads, and how the
server combines the uploads. A new method is one file here: a `FederatedMethod` subclass that also carries
what the card and the demo say about it (name, description, citation, recipe), its config class, and one
`register_method` call (hf_fedlora.methods.registry).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..federation.adapter_state import HEAD, LORA_A, LORA_B, weighted_average

if TYPE_CHECKING:
    from .lora import FedLoraConfig


@dataclass(frozen=True)
class DefaultLearningRate:
    """A learning rate (AdamW, constant) and where the number came from; `tuned` is False for a fallback that was
    not chosen for the method (the training arguments' default)."""

    value: float
    source: str
    tuned: bool = True


#: Where the demo recipe's learning rates come from; each method's `recipe_learning_rate` adds its own numbers.
RECIPE_SWEEP = (
    "benchmarks/lr_sweep.py on validation tweets carved from the training split (recipe: 8 Dirichlet(0.5) clients, "
    "logical batch 96, 6 rounds x 4 local steps, LoRA on MiniLM's layers 3-5, dropout off, the head on the mean over "
    "tokens, (8, 1e-6)-DP; seed 0; benchmarks/RESULTS.md#learning-rates)"
)


class FederatedMethod:
    """Base: every round is one sub-round in which A and B train together and are averaged.

    The class attributes describe the method to people (the model card) and to the demo's recipe; the registry
    (`register_method`) checks them when the method is registered.
    """

    #: Registry key, recorded in `federated_training.json` and given to `--method` (lower case, e.g. "ffa_lora").
    name: ClassVar[str] = "base"
    #: How the model card names the method (e.g. "FFA-LoRA").
    display_name: ClassVar[str] = ""
    #: The model card's sentence: what trains, what is sent and how the server combines it.
    description: ClassVar[str] = ""
    #: BibTeX entry of the method's paper, cited on the card; None for a method without one.
    citation: ClassVar[str | None] = None
    #: The demo recipe's learning rate and where it came from; None: not tuned (the demo then runs the training
    #: arguments' default rate and says so).
    recipe_learning_rate: ClassVar[DefaultLearningRate | None] = None
    #: Config fields the demo recipe sets beyond the learning rate (e.g. FFA-LoRA's lr_ratio_b=0.1); others keep
    #: the config's defaults.
    recipe_settings: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: FedLoraConfig):
        self.config = config

    # --- what trains when -------------------------------------------------------------
    def num_sub_rounds(self, round_index: int) -> int:
        """Local passes per round (DEeR trains B, then A: two)."""
        return 1

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        """LoRA factors that train at this local step; the other factor stays frozen."""
        return frozenset({LORA_A, LORA_B})

    def trained_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        """Everything trainable at this step: the LoRA factors plus the task head, which always trains."""
        return self.trained_lora_factors(round_index, sub_round, step) | {HEAD}

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        """What a client sends after the sub-round: by default whatever could have trained in it."""
        return frozenset({LORA_A, LORA_B, HEAD})

    # --- what the privacy layer and the optimizer need to know --------------------------
    def regulates_noise(self) -> bool:
        """DEeR's noise regulator: shape the DP noise on a trained LoRA factor by its peer's current value.

        The privacy layer does the shaping (and keeps the noise at least nominal in every direction);
        the method only says whether it wants it.
        """
        return False

    def noisy_gradient_filter(self) -> str | None:
        """Name of a post-noise filter (LA-LoRA: "binomial_lowpass") the privacy layer applies; None for none."""
        return None

    def learning_rate_scale(self, factor: str) -> float:
        """Multiplier of the learning rate for one factor (LoRA A, LoRA B or the head); 1 by default."""
        return 1.0

    # --- how the server combines ------------------------------------------------------
    def aggregate(
        self, uploads: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> dict[str, torch.Tensor]:
        """FedAvg of each uploaded tensor separately (A and B averaged independently)."""
        return weighted_average(uploads, weights)

    def after_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A server step on the new global adapter after each (sub-)round's aggregation (FedSVD re-factorises B A);
        returns the tensors it replaces, none by default. It sees only the aggregate, never an upload, so under DP
        it is post-processing of what was already released."""
        return {}

    def streaming_aggregator(self) -> WeightedMeanAccumulator | None:
        """A running aggregate the server folds each upload into as it arrives, so its memory does not grow with
        the clients of a round; it must give what `aggregate` gives. None: the method needs all uploads at once
        (the server then holds them and calls `aggregate`). A weighted mean streams."""
        return WeightedMeanAccumulator()

    # --- shared start -----------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, model: nn.Module) -> None:
        """Re-initialise A from the config's shared seed so every client (and process) holds the same A.

        B keeps PEFT's zero init, so the adapted model starts equal to the base model.
        """
        generator = torch.Generator().manual_seed(self.config.init_seed)
        for name, parameter in model.named_parameters():
            if ".lora_A." not in name:  # linear LoRA A; embedding adapters keep PEFT's own init
                continue
            values = torch.empty(parameter.shape, dtype=torch.float32)
            if self.config.init_lora_weights == "gaussian":
                nn.init.normal_(values, std=1.0 / parameter.shape[0], generator=generator)  # shape[0] is r
            else:  # PEFT's default LoRA init for A
                nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            parameter.copy_(values.to(parameter.dtype))


class WeightedMeanAccumulator:
    """FedAvg folded one upload at a time: a float32 running weighted sum per tensor and the total weight."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, upload: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one client's upload in; the upload can be freed as soon as this returns."""
        if self.count and set(upload) != set(self._sums):
            raise ValueError(
                f"upload holds tensors {sorted(set(upload) ^ set(self._sums))} that the round's other uploads "
                "do not (or lacks them): every client of a (sub-)round must send the same tensors"
            )
        for name, tensor in upload.items():
            if name in self._sums:
                self._sums[name].add_(tensor.float(), alpha=float(weight))
            else:
                self._sums[name] = tensor.float() * float(weight)
                self._dtypes[name] = tensor.dtype
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted mean of everything added (weights renormalised to sum to one), in each upload's dtype."""
        if not self.count:
            raise ValueError("The aggregate is empty: no client uploaded anything this (sub-)round")
        if self.total_weight <= 0:
            raise ValueError(f"aggregation weights must sum to a positive number, got {self.total_weight}")
        return {name: (total / self.total_weight).to(self._dtypes[name]) for name, total in self._sums.items()}
