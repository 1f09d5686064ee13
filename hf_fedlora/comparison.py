"""What a fair comparison of federated methods needs: one learning-rate table and an equal example budget.

Used by `hf-fedlora demo --compare` and by benchmarks/utility.py, so both run every method at the same
rate and on the same number of examples.
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import CONFIG_CLASSES
from .methods.base import FederatedMethod


@dataclass(frozen=True)
class DefaultLearningRate:
    """A method's default learning rate (AdamW, constant) and where the number came from."""

    value: float
    source: str


_RECIPE_SWEEP = (
    "benchmarks/lr_sweep.py on validation tweets carved from the training split (recipe: 8 Dirichlet(0.5) clients, "
    "logical batch 96, 6 rounds x 4 local steps, LoRA on MiniLM's layers 3-5, dropout off, the head on the mean over "
    "tokens, (8, 1e-6)-DP; seed 0; benchmarks/RESULTS.md, section 16)"
)
#: Default learning rate per registered method (AdamW defaults otherwise), the best validation accuracy of the rates
#: tried. FFA-LoRA trains B alone and lora_alpha only rescales B's rate, so it needs a larger rate than LoRA
#: (ALGORITHMS.md); the recipe also trains its B at a tenth of this (RECIPE_METHOD_SETTINGS).
DEFAULT_LEARNING_RATES: dict[str, DefaultLearningRate] = {
    "lora": DefaultLearningRate(5e-3, _RECIPE_SWEEP + ": 5e-3 (val. acc. 0.618) over 1e-2 (0.606) and 2e-2 (0.574)"),
    "ffa_lora": DefaultLearningRate(
        5e-2, _RECIPE_SWEEP + ", lora_B at 0.1x: 5e-2 (val. acc. 0.686; 0.677 over three seeds); section 15"
    ),
    "rolora": DefaultLearningRate(2e-2, _RECIPE_SWEEP + ": 2e-2 (val. acc. 0.658) over 5e-2 (0.388)"),
    "deer": DefaultLearningRate(1e-2, _RECIPE_SWEEP + ": 1e-2 (val. acc. 0.656) over 2e-2 (0.650) and 5e-2 (0.564)"),
    "la_lora": DefaultLearningRate(5e-2, _RECIPE_SWEEP + ": 5e-2 (val. acc. 0.656) over 2e-2 (0.646)"),
}

#: Method settings of the recipe beyond the learning rate (config fields, else each config's paper default), chosen
#: on validation tweets with the mean-pooled MiniLM (benchmarks/RESULTS.md, section 15): FFA-LoRA's lora_B at a
#: tenth of the head's rate (val. acc. 0.677 over 0.651 at one rate, three seeds; test 0.676 over 0.628).
RECIPE_METHOD_SETTINGS: dict[str, dict[str, float]] = {"ffa_lora": {"lr_ratio_b": 0.1}}


def recipe_settings(method: str) -> dict[str, float]:
    """The method's config fields set by the recipe (empty: its config's defaults)."""
    return dict(RECIPE_METHOD_SETTINGS.get(method, {}))


def method_names() -> list[str]:
    """Names of every registered method, in registration order."""
    return [config_cls.method_class.name for config_cls in CONFIG_CLASSES]


def default_learning_rate(method: str) -> DefaultLearningRate:
    """The method's entry in DEFAULT_LEARNING_RATES; a clear error for a method registered without one."""
    if method not in DEFAULT_LEARNING_RATES:
        raise ValueError(
            f"No default learning rate for method {method!r}: pass one explicitly (e.g. --learning_rate) or add it "
            "to hf_fedlora.comparison.DEFAULT_LEARNING_RATES with where it came from"
        )
    return DEFAULT_LEARNING_RATES[method]


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
