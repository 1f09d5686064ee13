"""Split one dataset into per-client datasets for simulated federated learning.

Federated experiments need one centralised dataset cut into clients in a controlled, repeatable way: an IID
split as the easy baseline, Dirichlet label skew (Hsu et al., 2019) as the usual non-IID benchmark, explicit
per-client label mixes (as in FFA-LoRA) for hand-designed heterogeneity, and a natural client id column when
the data already says who wrote what. Every scheme is seeded, puts each example in exactly one client and
keeps the original example order inside each client, so runs can be reproduced and compared.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from datasets import Dataset

SCHEMES = ("iid", "dirichlet", "label_proportions", "column")
DEFAULT_LABEL_COLUMNS = ("label", "labels")


def partition_iid(dataset: Dataset, num_clients: int, seed: int = 0) -> list[Dataset]:
    """Shuffle and deal the examples into nearly equal clients: the homogeneous baseline that every
    non-IID result is compared against."""
    _check_num_clients(num_clients, len(dataset))
    rng = np.random.default_rng(seed)
    return _select_clients(dataset, np.array_split(rng.permutation(len(dataset)), num_clients))


def partition_dirichlet(
    dataset: Dataset, num_clients: int, alpha: float, label_column: str, seed: int = 0
) -> list[Dataset]:
    """Label-skewed clients as in Hsu et al. (2019) / FedML: each label is shared among the clients by
    proportions drawn from Dir(alpha), so a small alpha gives clients few dominant labels and a large
    alpha approaches IID.

    Empty clients are not resampled away (that would bias the distribution); they raise instead.
    """
    _check_num_clients(num_clients, len(dataset))
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet_alpha must be a finite number > 0, got {alpha!r}")
    groups = _indices_by_value(_read_column(dataset, label_column, "label_column"))
    rng = np.random.default_rng(seed)
    parts = _split_each_label(groups, num_clients, rng, lambda _: rng.dirichlet(np.full(num_clients, float(alpha))))
    empty = _empty_clients(parts)
    if empty:
        raise ValueError(
            f"the dirichlet partition left {', '.join(empty)} empty (num_clients={num_clients}, "
            f"dirichlet_alpha={alpha}); use a larger dirichlet_alpha or fewer clients"
        )
    return _select_clients(dataset, parts)


def partition_by_label_proportions(
    dataset: Dataset, proportions: Sequence[Sequence[float]], label_column: str, seed: int = 0
) -> list[Dataset]:
    """Clients with hand-chosen label mixes, FFA-LoRA style: row k of `proportions` is client k and column c
    the c-th label in sorted order. Each label's examples are shared among the clients in proportion to its
    column, so with balanced labels client k's label mix is its row."""
    matrix = parse_label_proportions(proportions)
    _check_num_clients(matrix.shape[0], len(dataset), name="label_proportions rows")
    groups = _indices_by_value(_read_column(dataset, label_column, "label_column"))
    if matrix.shape[1] != len(groups):
        raise ValueError(
            f"label_proportions has {matrix.shape[1]} columns but label_column {label_column!r} has "
            f"{len(groups)} distinct labels {list(groups)}; give one column per label, in sorted label order"
        )
    columns = dict(zip(groups, matrix.T, strict=True))
    rng = np.random.default_rng(seed)
    parts = _split_each_label(groups, matrix.shape[0], rng, lambda label: columns[label] / columns[label].sum())
    empty = _empty_clients(parts)
    if empty:
        raise ValueError(
            f"label_proportions left {', '.join(empty)} empty: the dataset ({len(dataset)} examples) has "
            "too few examples of their labels; use more data or larger proportions for those rows"
        )
    return _select_clients(dataset, parts)


def _split_each_label(
    groups: dict, num_clients: int, rng: np.random.Generator, proportions_for: Callable[[object], np.ndarray]
) -> list[np.ndarray]:
    """Shuffle each label's examples and cut them among the clients by that label's proportions."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label, indices in groups.items():
        shuffled = rng.permutation(indices)
        for client, chunk in enumerate(_split_by_proportions(shuffled, proportions_for(label))):
            chunks[client].append(chunk)
    return [np.concatenate(client_chunks) for client_chunks in chunks]


def partition_by_column(dataset: Dataset, column: str) -> dict[str, Dataset]:
    """One client per distinct value of a natural client id column (user, author, hospital, ...), keyed by
    str(value) in sorted value order."""
    groups = _indices_by_value(_read_column(dataset, column, "client_column"))
    if not groups:
        raise ValueError(f"client_column {column!r} gives no clients: the dataset has 0 examples")
    return {str(value): dataset.select(indices) for value, indices in groups.items()}


def label_histogram(dataset: Dataset, label_column: str) -> dict[int | str, int]:
    """Count examples per label, sorted by label, so logs show each client's label skew at a glance."""
    counts = Counter(_read_column(dataset, label_column, "label_column"))
    return {label: counts[label] for label in sorted(counts)}


def partition_dataset(
    dataset: Dataset,
    *,
    scheme: str,
    num_clients: int | None,
    seed: int = 0,
    label_column: str | None = None,
    dirichlet_alpha: float = 0.5,
    label_proportions: Sequence[Sequence[float]] | str | None = None,
    client_column: str | None = None,
) -> dict[str, Dataset]:
    """Dispatch to one scheme from (command line) settings and name the clients.

    Returns an ordered dict: "client_0", "client_1", ... for the iid, dirichlet and label_proportions
    schemes, str(value) for the column scheme. For label-based schemes a missing `label_column` defaults to
    a "label" or "labels" column. For the label_proportions and column schemes `num_clients` may be None,
    otherwise it must match the number of rows / distinct values.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r} is unknown; allowed schemes are {', '.join(SCHEMES)}")
    if not isinstance(dataset, Dataset):
        raise ValueError(f"dataset must be a datasets.Dataset (one split), got {type(dataset).__name__}")

    if scheme == "column":
        if client_column is None:
            raise ValueError("client_column is required for scheme 'column'")
        if num_clients is not None:
            distinct = len(set(_read_column(dataset, client_column, "client_column")))
            if num_clients != distinct:
                raise ValueError(
                    f"num_clients={num_clients} but client_column {client_column!r} has {distinct} distinct "
                    "values; pass num_clients=None to take one client per value"
                )
        return partition_by_column(dataset, client_column)

    if scheme == "iid":
        _require_num_clients(num_clients, scheme)
        parts = partition_iid(dataset, num_clients, seed)
    elif scheme == "dirichlet":
        _require_num_clients(num_clients, scheme)
        label_column = _resolve_label_column(dataset, label_column, scheme)
        parts = partition_dirichlet(dataset, num_clients, dirichlet_alpha, label_column, seed)
    else:
        if label_proportions is None:
            raise ValueError(
                "label_proportions is required for scheme 'label_proportions', e.g. '[[0.1, 0.9], [0.9, 0.1]]'"
            )
        matrix = parse_label_proportions(label_proportions)
        if num_clients is not None and num_clients != matrix.shape[0]:
            raise ValueError(
                f"num_clients={num_clients} but label_proportions has {matrix.shape[0]} rows (one per "
                "client); pass num_clients=None to take it from label_proportions"
            )
        label_column = _resolve_label_column(dataset, label_column, scheme)
        parts = partition_by_label_proportions(dataset, matrix, label_column, seed)
    return {f"client_{k}": part for k, part in enumerate(parts)}


def parse_label_proportions(proportions: Sequence[Sequence[float]] | str) -> np.ndarray:
    """Turn a nested list or a JSON string (as given on a command line) into a validated clients x labels
    matrix: non-negative, finite, and with no all-zero row (empty client) or column (unassigned label)."""
    if isinstance(proportions, str):
        try:
            proportions = json.loads(proportions)
        except json.JSONDecodeError as err:
            raise ValueError(f"label_proportions is not valid JSON: {proportions!r} ({err})") from err
    try:
        matrix = np.asarray(proportions, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(_matrix_shape_error(proportions)) from err
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(_matrix_shape_error(proportions))
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError(f"label_proportions must hold finite numbers >= 0, got {proportions!r}")
    zero_rows = np.flatnonzero(matrix.sum(axis=1) <= 0).tolist()
    if zero_rows:
        raise ValueError(f"label_proportions rows {zero_rows} sum to 0, so those clients would get no data")
    zero_columns = np.flatnonzero(matrix.sum(axis=0) <= 0).tolist()
    if zero_columns:
        raise ValueError(f"label_proportions columns {zero_columns} sum to 0, so those labels would go to no client")
    return matrix


def _matrix_shape_error(proportions: object) -> str:
    return (
        "label_proportions must be a non-empty rectangular matrix of numbers, one row per client and one "
        f"column per label, e.g. [[0.1, 0.9], [0.9, 0.1]]; got {proportions!r}"
    )


def _check_num_clients(num_clients: int, num_examples: int, name: str = "num_clients") -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_examples:
        raise ValueError(
            f"{name}={num_clients} but the dataset has {num_examples} examples; each client needs at least one"
        )


def _require_num_clients(num_clients: int | None, scheme: str) -> None:
    if num_clients is None:
        raise ValueError(f"num_clients is required for scheme {scheme!r}")


def _resolve_label_column(dataset: Dataset, label_column: str | None, scheme: str) -> str:
    """Default to the conventional "label" / "labels" column so the common case needs no flag."""
    if label_column is not None:
        return label_column
    for name in DEFAULT_LABEL_COLUMNS:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"label_column is required for scheme {scheme!r}: the dataset has no 'label' or 'labels' column; "
        f"columns are {dataset.column_names}"
    )


def _read_column(dataset: Dataset, column: str, field: str) -> list[int | str]:
    """Read one int or str value per example, whatever the dataset's format (a ClassLabel reads as int)."""
    if column not in dataset.column_names:
        raise ValueError(f"{field} {column!r} is not a column; columns are {dataset.column_names}")
    values = dataset.with_format("arrow")[column].to_pylist()
    bad_types = sorted({type(value).__name__ for value in values if not isinstance(value, (int, str))})
    if bad_types:
        raise ValueError(f"{field} {column!r} must hold one int or str per example, found {bad_types}")
    return values


def _indices_by_value(values: list[int | str]) -> dict[int | str, np.ndarray]:
    """Example indices (ascending) of each distinct value, in sorted value order."""
    groups: dict[int | str, list[int]] = defaultdict(list)
    for index, value in enumerate(values):
        groups[value].append(index)
    return {value: np.array(groups[value], dtype=np.int64) for value in sorted(groups)}


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Cut `indices` at the rounded cumulative proportions: one chunk per client, sizes summing exactly."""
    cuts = np.round(np.cumsum(proportions) * len(indices)).astype(np.int64)[:-1]
    return np.split(indices, cuts)


def _empty_clients(parts: list[np.ndarray]) -> list[str]:
    return [f"client_{k}" for k, part in enumerate(parts) if len(part) == 0]


def _select_clients(dataset: Dataset, parts: list[np.ndarray]) -> list[Dataset]:
    """Sorted indices keep each client's examples in the original dataset order."""
    return [dataset.select(np.sort(part).tolist()) for part in parts]
