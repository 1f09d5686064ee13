"""What a fair comparison of federated methods needs: one learning-rate table and an equal example budget.

Used by `hf-fedlora demo --compare` and by benchmarks/utility.py, so both run every method at the same
rate and on the same number of examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from typing import Any, TypeVar

from .methods import registered_config_classes
from .methods.base import DefaultLearningRate, FederatedMethod
from .training_args import FederatedTrainingArguments

_V = TypeVar("_V")


class _RegistryTable(Mapping[str, _V]):
    """A read-only table over the registered methods, read from their method classes on every access, so a method
    registered later appears in it (names with no entry are left out)."""

    def __init__(self, entry: Callable[[type[FederatedMethod]], _V | None]):
        self._entry = entry

    def _table(self) -> dict[str, _V]:
        entries = {cls.method_class.name: self._entry(cls.method_class) for cls in registered_config_classes()}
        return {name: value for name, value in entries.items() if value is not None}

    def __getitem__(self, method: str) -> _V:
        return self._table()[method]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return repr(self._table())


#: The recipe's learning rate per registered method that has one (each method class's `recipe_learning_rate`:
#: the best validation accuracy of the rates tried, with where it came from).
DEFAULT_LEARNING_RATES: Mapping[str, DefaultLearningRate] = _RegistryTable(lambda method: method.recipe_learning_rate)

#: The recipe's method settings beyond the learning rate, per method that sets any (each method class's
#: `recipe_settings`; other fields keep their config's defaults).
RECIPE_METHOD_SETTINGS: Mapping[str, dict[str, Any]] = _RegistryTable(
    lambda method: dict(method.recipe_settings) or None
)


def recipe_settings(method: str) -> dict[str, Any]:
    """The method's config fields set by the recipe (empty: its config's defaults)."""
    return dict(RECIPE_METHOD_SETTINGS.get(method, {}))


def method_names() -> list[str]:
    """Names of every registered method, in registration order."""
    return [config_cls.method_class.name for config_cls in registered_config_classes()]


def default_learning_rate(method: str) -> DefaultLearningRate:
    """The method's recipe rate; for a registered method without one, FederatedTrainingArguments' default
    learning_rate, marked as not tuned (`tuned=False`) so whoever runs it says so."""
    if method in DEFAULT_LEARNING_RATES:
        return DEFAULT_LEARNING_RATES[method]
    if method not in method_names():
        raise ValueError(f"Unknown federated method {method!r}; registered methods: {method_names()}")
    default = next(f.default for f in fields(FederatedTrainingArguments) if f.name == "learning_rate")
    return DefaultLearningRate(
        default, "FederatedTrainingArguments' default learning_rate, not tuned for this method", tuned=False
    )


def local_steps_per_sub_round(method: FederatedMethod, num_rounds: int, local_steps: int, split: bool = True) -> int:
    """Local steps for each of the method's sub-rounds so it processes the same examples as the others.

    With `split`, a method with k sub-rounds per round (DEeR: B, then A) runs `local_steps / k` steps in each,
    so its clients process the same number of examples and take the same number of noisy steps as a
    one-sub-round method. Without it, every sub-round runs `local_steps` (k times the work).
    """
    counts = {method.num_sub_rounds(r) for r in range(num_rounds)}
    if len(counts) != 1:
        raise ValueError(
            f"{method.name} changes its number of sub-rounds between rounds ({sorted(counts)}): "
            "an equal example budget per round is not defined for it"
        )
    sub_rounds = counts.pop()
    if not split or sub_rounds == 1:
        return local_steps
    if local_steps % sub_rounds:
        raise ValueError(
            f"local_steps={local_steps} does not split evenly into {method.name}'s {sub_rounds} sub-rounds per "
            f"round: use a multiple of {sub_rounds} (e.g. {sub_rounds * max(1, local_steps // sub_rounds)})"
        )
    return local_steps // sub_rounds
