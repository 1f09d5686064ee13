"""The DP recipe for text classification: settings that learn under example-level DP on data nobody tuned for.

DP-SGD wants few, well-used noisy steps on large batches, a head that reads a well-conditioned feature and no
dropout noise on top of the DP noise. The project chose its recipe on validation tweets carved from the training
split (benchmarks/RESULTS.md#recipe) and checked that it travels to other data (benchmarks/RESULTS.md#transfer);
this module turns it into settings for any federation:

- the model: a head on the masked mean over tokens (`pooling="mean"`, hf_fedlora.models), dropout off, LoRA on
  the upper half of the layers (no backward pass through the lower half);
- the method: its recipe learning rate and settings (FFA-LoRA's lora_B at a tenth of the head's rate), AdamW at a
  constant rate;
- the schedule, from the clients' sizes: a logical batch of 96 (64 to 256 scored alike at equal examples,
  RESULTS.md#logical-batch), capped at the smallest client's size (a client cannot sample more than all its
  examples; that client then loses its amplification by subsampling and gets more noise, weighted by its small
  share of the aggregate), and 6 rounds x 4 local steps: 24 noisy steps per client (3 steps at batch 1,024 lost
  3 points, 96 steps at batch 32 scored alike).

`dp_recipe` looks at nothing but the clients' sizes, which the record already states
(docs/algorithms.md#the-dp-recipes-inputs), and the method; what it chose and why is printed at the start
(`DPRecipe.describe`) and stated on the model card (`DPRecipe.selection_text`, the trainer's
`hyperparameter_selection`). It is not meant for client-level DP: there the number of clients and of rounds, not
the clients' sizes, set the noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .comparison import default_learning_rate, recipe_settings
from .methods.registry import config_class_for
from .models.pooling import pools_tokens

if TYPE_CHECKING:
    from datasets import Dataset

    from .training_args import FederatedTrainingArguments

#: The recipe's constants (benchmarks/RESULTS.md#recipe and #logical-batch say where each came from).
RECIPE_POOLING = "mean"
RECIPE_DROPOUT = 0.0
RECIPE_LOGICAL_BATCH = 96
RECIPE_MICRO_BATCH = 16
RECIPE_ROUNDS = 6
RECIPE_LOCAL_STEPS = 4
#: The smallest logical batch the recipe runs: below it the noise (sigma x clip / batch) swamps the signal. A client
#: must hold at least this many examples (its sample rate q = batch / size cannot exceed 1).
MIN_LOGICAL_BATCH = 16
#: The partition minimum the recipe asks for: a Dirichlet split is re-drawn until every client holds twice the
#: smallest batch, so that no client starts at q = 1.
MIN_CLIENT_SIZE = 2 * MIN_LOGICAL_BATCH


#: What benchmarks/RESULTS.md#transfer measured per method at the recipe on two datasets it was not chosen on.
TRANSFER_MEASURED = {
    "ffa_lora": "ffa_lora is the recipe's method: on two datasets the recipe never saw it kept 93-101% of its "
    "non-private federated accuracy at epsilon 3 and 8 (benchmarks/RESULTS.md#transfer)",
    "lora": "lora (DP-LoRA) kept only 77-81% of its non-private federated accuracy at epsilon 3 and 8 on two "
    "datasets the recipe never saw, and fell to the majority class on one seed: prefer ffa_lora "
    "(benchmarks/RESULTS.md#transfer)",
    "fedsvd": "fedsvd kept 92-97% of its non-private federated accuracy at epsilon 3 and 8 on two datasets the "
    "recipe never saw, within the seed spread of ffa_lora (benchmarks/RESULTS.md#transfer)",
}


class RecipeError(ValueError):
    """The clients cannot run the recipe; the message says which client and what would fix it."""


@dataclass(frozen=True)
class DPRecipe:
    """The settings `dp_recipe` chose, each with its reason; `training_arguments()` gives the trainer's fields."""

    method: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    num_rounds: int
    local_steps: int
    learning_rate: float
    partition_min_size: int
    method_settings: Mapping[str, Any] = field(default_factory=dict)
    pooling: str = RECIPE_POOLING
    dropout: float = RECIPE_DROPOUT
    lora_layers: tuple[int, ...] | None = None
    reasons: tuple[str, ...] = ()

    @property
    def logical_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def training_arguments(self, by_hand: Sequence[str] = ()) -> dict[str, Any]:
        """FederatedTrainingArguments fields: the schedule, the rate and how they were chosen (`by_hand`: the
        fields the user set, see `selection_text`)."""
        return {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_rounds": self.num_rounds,
            "local_steps": self.local_steps,
            "learning_rate": self.learning_rate,
            "lr_scheduler_type": "constant",
            "partition_min_size": self.partition_min_size,
            "hyperparameter_selection": self.selection_text(by_hand),
        }

    def describe(self) -> str:
        """The lines printed before training: each choice and why."""
        return "\n".join(["hf_fedlora DP recipe:", *(f"  - {reason}" for reason in self.reasons)])

    def selection_text(self, by_hand: Sequence[str] = ()) -> str:
        """What the card says of how the settings were chosen; `by_hand` names the fields the user set, whose
        settings the card then says were not the recipe's."""
        layers = "all" if self.lora_layers is None else str(list(self.lora_layers))
        settings = "".join(f", {k} {v:g}" for k, v in self.method_settings.items())
        choices = {  # what the card calls each choice: (its value, the fields a user sets it with)
            "logical batch": (self.logical_batch_size, {"per_device_train_batch_size", "gradient_accumulation_steps"}),
            "rounds": (self.num_rounds, {"num_rounds"}),
            "local steps": (self.local_steps, {"local_steps", "local_epochs"}),
            "learning rate": (f"{self.learning_rate:g}{settings}", {"learning_rate", "method_kwargs"}),
            "head's input": (self.pooling, {"pooling"}),
            "dropout": (f"{self.dropout:g}", {"dropout"}),
            "LoRA layers": (layers, {"lora_layers"}),
            "partition minimum": (self.partition_min_size, {"partition_min_size"}),
        }
        chosen = [f"{name} ({value})" for name, (value, fields) in choices.items() if not fields & set(by_hand)]
        manual = [name for name, (_, fields) in choices.items() if fields & set(by_hand)]
        text = (
            f"hf_fedlora's DP recipe (hf_fedlora.recipe) chose the {', '.join(chosen) or 'nothing'} from the "
            "clients' sizes alone, which example-level DP does not hide; its constants were chosen on other data "
            "(the project's tweets), not on these clients'."
        )
        return text + (f" Set by hand, not by the recipe: the {', '.join(manual)}." if manual else "")


def recipe_lora_layers(num_hidden_layers: int | None) -> tuple[int, ...] | None:
    """The upper half of the layers (at least one); None (all) when the depth is unknown."""
    if not num_hidden_layers:
        return None
    return tuple(range(num_hidden_layers // 2, num_hidden_layers))


def dp_recipe(
    client_sizes: Mapping[str, int] | Sequence[int],
    method: str,
    *,
    num_hidden_layers: int | None = None,
    model_type: str | None = None,
    micro_batch_size: int = RECIPE_MICRO_BATCH,
    partition_min_size: int = MIN_CLIENT_SIZE,
) -> DPRecipe:
    """The recipe's settings for clients of these sizes (examples per client) training `method` under example DP.

    Raises RecipeError, naming the client and the fixes, when the smallest client cannot take the smallest logical
    batch at the largest sample rate.
    """
    if isinstance(client_sizes, Mapping):
        sizes = dict(client_sizes)
    else:
        sizes = {f"client_{i}": n for i, n in enumerate(client_sizes)}
    if not sizes:
        raise RecipeError("dp_recipe needs at least one client")
    if any(not isinstance(n, int) or n < 0 for n in sizes.values()):
        raise RecipeError(f"client sizes must be counts of examples (ints >= 0), got {sizes}")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise RecipeError(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
    smallest = min(sizes, key=sizes.get)
    n_min, total = sizes[smallest], sum(sizes.values())
    capped = min(RECIPE_LOGICAL_BATCH, n_min)
    if capped < MIN_LOGICAL_BATCH:
        fewer = max(1, total // (4 * MIN_CLIENT_SIZE))  # an average of 4x the minimum leaves room for skew
        raise RecipeError(
            f"{smallest} holds {n_min} examples: the DP recipe needs every client to hold at least "
            f"{MIN_LOGICAL_BATCH} (its smallest logical batch; a client cannot sample more than all its examples). "
            f"Fixes: fewer clients (e.g. --num_clients {fewer}), a larger --dirichlet_alpha (less label skew, more "
            f"even sizes), --partition_min_size {MIN_CLIENT_SIZE} (re-draws a Dirichlet split until every client "
            "holds that many), or leave out the smallest clients"
        )
    sub_rounds = config_class_for(method)().build_method().num_sub_rounds(0)
    if RECIPE_LOCAL_STEPS % sub_rounds:
        raise RecipeError(
            f"{method} runs {sub_rounds} sub-rounds a round: the recipe's {RECIPE_LOCAL_STEPS} local "
            "steps do not split evenly among them"
        )
    pooling = RECIPE_POOLING if model_type is None or pools_tokens(model_type) else "pooler"
    micro = min(micro_batch_size, capped)
    accumulation = capped // micro
    batch = micro * accumulation
    lr = default_learning_rate(method)
    settings = recipe_settings(method)
    layers = recipe_lora_layers(num_hidden_layers)
    reasons = [
        f"logical batch {batch} ({accumulation} micro-batches of {micro}): the recipe's {RECIPE_LOGICAL_BATCH}"
        + (
            f", capped at the smallest client's size ({smallest}, {n_min} examples: it samples at q = "
            f"{batch / n_min:.2f}, with little amplification by subsampling and so more noise, in its small share "
            "of the aggregate)"
            if capped < RECIPE_LOGICAL_BATCH
            else f"; the smallest client ({smallest}, {n_min} examples) samples at q = {batch / n_min:.3f}"
        ),
        f"{RECIPE_ROUNDS} rounds x {RECIPE_LOCAL_STEPS} local steps: {RECIPE_ROUNDS * RECIPE_LOCAL_STEPS} noisy steps "
        "per client, few and well used (at equal examples, 3 steps of a larger batch lost accuracy; 24-96 scored "
        "alike)" + (f"; {method} splits them among its {sub_rounds} sub-rounds" if sub_rounds > 1 else ""),
        f"learning rate {lr.value:g}"
        + "".join(f", {k} {v:g}" for k, v in settings.items())
        + f", AdamW at a constant rate: {method}'s recipe rate (hf_fedlora.comparison)"
        + ("" if lr.tuned else ", not tuned for this method"),
        (
            f"the head reads the masked mean over tokens (pooling '{RECIPE_POOLING}'), not BERT's pooler"
            if pooling == RECIPE_POOLING
            else f"the head is the checkpoint's own (pooling 'pooler'): hf_fedlora.models has no mean-pooling "
            f"classifier for model type {model_type!r}"
        )
        + "; dropout is off: a well-conditioned feature and no second source of noise",
        "LoRA on "
        + ("every layer (depth unknown)" if layers is None else f"layers {list(layers)}, the upper half")
        + ": no backward pass through the lower layers, at no cost in accuracy on the tuning data",
        "the same schedule at every epsilon: the budget sets each client's noise multiplier, calibrated before "
        "training (measured at epsilon 3 and 8 on data the recipe never saw: benchmarks/RESULTS.md#transfer)",
        TRANSFER_MEASURED.get(method, f"{method} was not measured on data the recipe never saw"),
        f"partition_min_size {partition_min_size}: a Dirichlet split is re-drawn until every client holds that many",
        f"chosen from the {len(sizes)} clients' sizes only ({total} examples); the data were not looked at",
    ]
    return DPRecipe(
        method=method,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        num_rounds=RECIPE_ROUNDS,
        local_steps=RECIPE_LOCAL_STEPS // sub_rounds,
        learning_rate=lr.value,
        partition_min_size=partition_min_size,
        method_settings=settings,
        pooling=pooling,
        lora_layers=layers,
        reasons=tuple(reasons),
    )


def recipe_client_sizes(train_dataset: Dataset, args: FederatedTrainingArguments) -> dict[str, int]:
    """Each client's number of examples, split exactly as FederatedTrainer will split `train_dataset` with `args`."""
    from .federation.clients import clients_from

    clients, _, _ = clients_from(train_dataset, args)
    return {name: len(data) for name, data in clients.items()}


def apply_dp_recipe(
    args: FederatedTrainingArguments,
    train_dataset: Dataset,
    method: str,
    *,
    num_hidden_layers: int | None = None,
    model_type: str | None = None,
    keep: Sequence[str] = (),
) -> tuple[DPRecipe, FederatedTrainingArguments]:
    """(the recipe, `args` with the recipe's fields) for FederatedTrainer(train_dataset=...) under example-level DP;
    on a non-private run it gives the same settings (a baseline at the same budget).

    Fields named in `keep` (the ones a user set by hand, also the model's: pooling, dropout, lora_layers,
    method_kwargs) stay as they are and the card says so; `local_epochs` in `keep` keeps the
    user's epochs instead of the recipe's local steps. The split is made with the recipe's partition_min_size (or
    the kept one) and recorded, so the trainer splits the same way.
    """
    if args.private and args.dp_unit != "example":
        raise RecipeError(
            f"the DP recipe is for example-level DP; this run has dp_unit={args.dp_unit!r}, where the number of "
            "clients and rounds, not the clients' sizes, set the noise: choose those by hand"
        )
    min_size = args.partition_min_size if "partition_min_size" in keep and args.partition_min_size else MIN_CLIENT_SIZE
    split_args = replace(args, partition_min_size=min_size)
    recipe = dp_recipe(
        recipe_client_sizes(train_dataset, split_args),
        method,
        num_hidden_layers=num_hidden_layers,
        model_type=model_type,
        micro_batch_size=args.per_device_train_batch_size
        if "per_device_train_batch_size" in keep
        else RECIPE_MICRO_BATCH,
        partition_min_size=min_size,
    )
    fields = {k: v for k, v in recipe.training_arguments(keep).items() if k not in keep}
    if "local_epochs" in keep and args.local_epochs is not None:
        fields.pop("local_steps", None)
    return recipe, replace(args, **fields)
