"""DP-LoRA / FedIT baseline: A and B train together and are averaged separately (FedAvg).

Averaging the factors separately is not averaging the clients' updates: the aggregation
deviation sum_k p_k B_k A_k - B_bar A_bar is not zero. This is the baseline the other
methods improve on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from peft import LoraConfig

from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod


def check_learning_rate_ratio(name: str, ratio: object) -> None:
    """A factor's learning-rate ratio must be a positive finite number (0 would freeze what the method trains)."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"{name} must be a positive finite number (a ratio of learning rates), got {ratio!r}")


class FedLoraMethod(FederatedMethod):
    name = "lora"
    display_name = "LoRA (the DP-LoRA / FedIT baseline)"
    description = (
        "A and B are trained together on every client and averaged separately by the server (FedAvg of each "
        "factor), which is not exactly the average of the clients' updates."
    )
    citation = """@inproceedings{hu2022lora,
  title     = {{LoRA}: Low-Rank Adaptation of Large Language Models},
  author    = {Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and
               Wang, Shean and Wang, Lu and Chen, Weizhu},
  booktitle = {The Tenth International Conference on Learning Representations (ICLR)},
  year      = {2022}
}"""
    recipe_learning_rate = DefaultLearningRate(
        5e-3, RECIPE_SWEEP + ": 5e-3 (val. acc. 0.618) over 1e-2 (0.606) and 2e-2 (0.574)"
    )


@dataclass
class FedLoraConfig(LoraConfig):
    """A `peft.LoraConfig` for federated training (the DP-LoRA baseline).

    It keeps `peft_type=LORA`: the federated fields below are left out of
    `adapter_config.json`, so plain `peft` loads the saved adapter as an ordinary LoRA.
    """

    init_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the shared initialisation of lora_A. Every client (and every process, e.g. with "
            "Flower) draws the same A from it, as the federated methods require."
        },
    )

    method_class: ClassVar[type[FederatedMethod]] = FedLoraMethod
    federated_fields: ClassVar[tuple[str, ...]] = ("init_seed",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_seed, int) or isinstance(self.init_seed, bool) or self.init_seed < 0:
            raise ValueError(f"init_seed must be a non-negative integer, got {self.init_seed!r}")
        if self.use_dora:
            raise ValueError(
                "use_dora=True is not supported for federated training: DoRA's magnitude vector is neither a LoRA "
                "factor nor a task head, so no method would train, send or average it. Use use_dora=False."
            )
        if self.bias != "none":
            raise ValueError(
                f"bias={self.bias!r} is not supported for federated training: the federated adapter state holds the "
                "LoRA factors and the task head only, so the biases PEFT would unfreeze would never be trained, sent "
                "or averaged (and under DP the first step fails on their per-example gradients). Use bias='none'; "
                "to train a whole module, bias included, list it in modules_to_save."
            )
        if self.init_lora_weights not in (True, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported for federated training: "
                "use True (PEFT's default: Kaiming-uniform A, zero B) or 'gaussian'. Federated methods need "
                "B = 0 at the start and an A that every client can draw from the shared init_seed."
            )

    @property
    def method_name(self) -> str:
        return self.method_class.name

    def build_method(self) -> FederatedMethod:
        """The object that tells the trainer what trains, what is sent and how it is combined."""
        return self.method_class(self)

    def to_dict(self) -> dict[str, Any]:
        """The plain LoraConfig fields only, so `adapter_config.json` loads in plain `peft` without warnings."""
        config = super().to_dict()
        for name in self.federated_fields:
            config.pop(name, None)
        return config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load a saved federated adapter's config as the method's own config class (e.g. `FFALoraConfig`).

        `adapter_config.json` holds the plain LoRA fields; the method and its federated settings come from
        the `federated_training.json` saved beside it (local folder or Hub repo).
        """
        from ..hub import load_federated_record
        from . import config_class_for

        plain = LoraConfig.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        location = (
            pretrained_model_name_or_path if subfolder is None else f"{pretrained_model_name_or_path}/{subfolder}"
        )
        hub_kwargs = {key: kwargs[key] for key in ("revision", "token", "cache_dir") if key in kwargs}
        record = load_federated_record(location, **hub_kwargs)
        config_cls = config_class_for(record["method"]["method"])
        if not issubclass(config_cls, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config_cls.__name__} adapter, not a {cls.__name__}"
            )
        values = {f.name: getattr(plain, f.name) for f in fields(LoraConfig) if f.init}
        values.update(
            {name: record["method"][name] for name in config_cls.federated_fields if name in record["method"]}
        )
        config = config_cls(**values)
        # The run that trained this adapter: a FederatedTrainer continuing it composes with its spent privacy.
        config.federated_record = record
        return config

    def federated_dict(self) -> dict[str, Any]:
        """The method and its federated settings (what `to_dict` leaves out), for the run's record."""
        return {"method": self.method_name, **{name: getattr(self, name) for name in self.federated_fields}}
