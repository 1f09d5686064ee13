"""A method as a user would add one: one file's worth (a method class with its card text and no tuned rate, its
config class), registered with one call. `registered_toy()` registers it and unregisters it on the way out."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from hf_fedlora.federation.adapter_state import HEAD, LORA_B
from hf_fedlora.methods import FederatedMethod, FedLoraConfig, register_method, unregister_method

TOY_CITATION = """@misc{toy2026lora,
  title = {A Toy Federated {LoRA} Method},
  year  = {2026}
}"""


class ToyMethod(FederatedMethod):
    name = "toy_lora"
    display_name = "Toy-LoRA"
    description = "B alone trains and is sent, a test's own sentence for the model card."
    citation = TOY_CITATION
    # no recipe_learning_rate: the demo runs it at the training arguments' default and says the rate is untuned

    def trained_lora_factors(self, round_index: int, sub_round: int, step: int) -> frozenset[str]:
        return frozenset({LORA_B})

    def uploaded_factors(self, round_index: int, sub_round: int) -> frozenset[str]:
        return frozenset({LORA_B, HEAD})


@dataclass
class ToyConfig(FedLoraConfig):
    method_class: ClassVar[type[FederatedMethod]] = ToyMethod


@contextmanager
def registered_toy() -> Iterator[type[ToyConfig]]:
    register_method(ToyConfig)
    try:
        yield ToyConfig
    finally:
        unregister_method(ToyMethod.name)
