"""The clients a run trains: built from what the user passes (one dataset to split, or ready-made clients), and their
data checked against the model before any privacy budget is spent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict
from peft import PeftModel

from .partition import DEFAULT_LABEL_COLUMNS, label_histogram, partition_dataset

if TYPE_CHECKING:  # annotations only: nothing here imports upwards
    from ..methods import FedLoraConfig
    from ..training_args import FederatedTrainingArguments


def clients_from(
    train_dataset: Dataset | Sequence[Dataset] | Mapping[str, Dataset] | None, args: FederatedTrainingArguments
) -> tuple[dict[str, Dataset], bool, int | None]:
    """(name -> client dataset, given ready-made?, partition draws): from a list/dict or by partitioning; fails
    before training."""
    if train_dataset is None:
        raise ValueError("train_dataset is required: one Dataset to partition, or a list/dict of client datasets")
    if isinstance(train_dataset, DatasetDict):
        raise ValueError(
            f"train_dataset is a DatasetDict with splits {list(train_dataset)}: pass the training split alone "
            "(e.g. ds['train']) to be partitioned into clients, or a plain dict {client name: Dataset} of "
            "ready-made clients"
        )
    draws = None
    if isinstance(train_dataset, Dataset):
        if args.partition in ("iid", "dirichlet") and args.num_clients is None:
            raise ValueError(f"num_clients must be set to split train_dataset with partition={args.partition!r}")
        partition = partition_dataset(
            train_dataset,
            scheme=args.partition,
            num_clients=args.num_clients,
            seed=partition_seed(args),
            label_column=args.label_column,
            dirichlet_alpha=args.dirichlet_alpha,
            label_proportions=args.parsed_label_proportions(),
            client_column=args.client_column,
            min_partition_size=args.effective_partition_min_size,
        )
        clients, given, draws = dict(partition), False, partition.draws
    elif isinstance(train_dataset, Mapping):
        clients = {str(name): data for name, data in train_dataset.items()}
        given = True
    elif isinstance(train_dataset, Sequence) and not isinstance(train_dataset, str):
        clients = {f"client_{i}": data for i, data in enumerate(train_dataset)}
        given = True
    else:
        raise ValueError(f"train_dataset must be a Dataset, a list or a dict of Datasets, got {type(train_dataset)}")
    if given:
        if not clients:
            raise ValueError("train_dataset holds no clients")
        if args.num_clients is not None and args.num_clients != len(clients):
            raise ValueError(f"num_clients={args.num_clients} but train_dataset holds {len(clients)} clients")
        for name, data in clients.items():
            if not isinstance(data, Dataset):
                raise ValueError(f"client {name!r} is a {type(data).__name__}, expected a datasets.Dataset")
    empty = [name for name, data in clients.items() if len(data) == 0]
    if empty:
        raise ValueError(f"Clients {empty} have no examples: every client needs data")
    if args.clients_per_round is not None and args.clients_per_round > len(clients):
        raise ValueError(f"clients_per_round={args.clients_per_round} exceeds the {len(clients)} clients")
    return clients, given, draws


def check_data(
    model: PeftModel,
    config: FedLoraConfig,
    clients: Mapping[str, Dataset],
    eval_dataset: Any,
    label_column: str | None,
) -> None:
    """Inputs the model cannot take, and labels its head cannot score, fail here: before any budget is spent."""
    base = model.get_base_model()
    input_name = getattr(base, "main_input_name", None)
    model_config = getattr(base, "config", None)
    task_type = str(getattr(config.task_type, "value", config.task_type))
    datasets = {f"client {name!r}": data for name, data in clients.items()}
    if isinstance(eval_dataset, Dataset):
        datasets["eval_dataset"] = eval_dataset
    for where, data in datasets.items():
        transformed = data.format.get("type") == "custom"  # e.g. images turned into pixel_values on access
        missing = input_name and input_name not in data.column_names and "inputs_embeds" not in data.column_names
        if missing and not transformed:
            raise ValueError(
                f"{where} has no {input_name!r} column, which the model takes as input (columns: "
                f"{data.column_names}). Preprocess it first, e.g. dataset.map(tokenizer or image processor)."
            )
        column = next(
            (c for c in ([label_column] if label_column else ["label", "labels"]) if c in data.column_names), None
        )
        if column is not None and model_config is not None:
            check_labels(data, column, where, model_config, task_type)


def check_labels(data: Dataset, column: str, where: str, model_config: Any, task_type: str) -> None:
    """Class labels must be integer ids the head has; token labels may also be -100 (ignored)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = data.data.column(column)
    token_level = pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
    if token_level:
        values = pc.list_flatten(values)
    if task_type == "CAUSAL_LM":
        classes, name = getattr(model_config, "vocab_size", None), "vocab_size"
    else:
        classes, name = getattr(model_config, "num_labels", None), "num_labels"
    regression = getattr(model_config, "problem_type", None) == "regression" or (classes == 1 and not token_level)
    multi_label = getattr(model_config, "problem_type", None) == "multi_label_classification"
    if regression or multi_label or classes is None or len(values) == 0:
        return
    if not pa.types.is_integer(values.type):
        raise ValueError(
            f"{where}: column {column!r} holds {values.type} values, but classification needs integer class ids "
            f"0..{classes - 1}: encode them first (e.g. dataset.class_encode_column({column!r}) for strings, or "
            "cast floats to int)"
        )
    valid = values if not token_level else pc.filter(values, pc.not_equal(values, -100))
    if len(valid) == 0:
        return
    low, high = pc.min_max(valid).values()
    if low.as_py() < 0 or high.as_py() >= classes:
        raise ValueError(
            f"{where}: column {column!r} has labels from {low.as_py()} to {high.as_py()}, but the model has "
            f"{name}={classes} (ids 0..{classes - 1}"
            + (", or -100 for ignored tokens)" if token_level else ")")
            + f". Build the model with {name} covering every label, or fix the labels."
        )


def partition_seed(args: FederatedTrainingArguments) -> int:
    return args.partition_seed if args.partition_seed is not None else args.seed


def label_histograms(clients: Mapping[str, Dataset], label_column: str | None) -> dict[str, dict]:
    columns = [label_column] if label_column else list(DEFAULT_LABEL_COLUMNS)
    histograms = {}
    for name, data in clients.items():
        column = next((c for c in columns if c in data.column_names), None)
        if column is None:
            continue
        try:
            histograms[name] = {str(k): v for k, v in label_histogram(data, column).items()}
        except ValueError:  # not class labels (e.g. regression targets): nothing to count
            continue
    return histograms
