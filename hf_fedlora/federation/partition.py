"""Split one dataset into per-client datasets for simulated federated learning.

Federated experiments need one centralised dataset cut into clients in a controlled, repeatable way: an IID
split as the easy baseline, Dirichlet label skew (Hsu et al., 2019) as the usual non-IID benchmark, explicit
per-client label mixes (as in FFA-LoRA) for hand-designed heterogeneity, and a natural client id column when
the data already says who wrote what. Every scheme is seeded, puts each example in exactly one client and
keeps the original example order inside each client, so runs can be reproduced and compared.

Stable under adding or removing one example. The privacy promise says the run's guarantee is the largest client
epsilon; that holds only if adding or removing one example changes one client's data and no other. So the iid,
dirichlet and label_proportions schemes place each example from a keyed hash of its own content and the seed
(never from its position or the other examples): BLAKE2b of every column of the row, in column order, gives a
number u in [0, 1), and u decides the client. A label's client proportions (Dirichlet) are drawn from the seed,
the label and the draw number alone. Consequences worth knowing: client sizes are random (about n/K plus or minus
sqrt(n/K)), not dealt out equally; two identical rows always land in the same client; and a column that numbers
the rows makes a row's content depend on its position, so inserting a row in the middle would renumber (and
move) the rows after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import struct
import sys
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from datasets import Dataset

SCHEMES = ("iid", "dirichlet", "label_proportions", "column")
DEFAULT_LABEL_COLUMNS = ("label", "labels")
MAX_DIRICHLET_DRAWS = 10  # draws of the Dirichlet proportions tried before a too-small client is an error
_HASH_BATCH_ROWS = 1024  # rows read into Python at a time while hashing (bounds memory for image datasets)


class ClientPartition(dict):
    """Client name -> Dataset, as a plain dict, plus `draws`: how many draws of the Dirichlet label proportions
    were made before every client held at least the minimum size (1 when nothing was re-drawn, and for every
    other scheme). A record of the split should report it: a re-draw depends on the clients' sizes."""

    def __init__(self, clients: Mapping[str, Dataset] | Iterable[tuple[str, Dataset]] = (), draws: int = 1):
        super().__init__(clients)
        self.draws = draws


def partition_iid(dataset: Dataset, num_clients: int, seed: int = 0, min_partition_size: int = 1) -> list[Dataset]:
    """The homogeneous baseline that every non-IID result is compared against: example with hash position u
    goes to client floor(u * num_clients), so each client holds a uniformly random share of about 1/num_clients.

    There is nothing to re-draw, so a client below `min_partition_size` (or an empty one) raises."""
    _check_sizes_possible(num_clients, len(dataset), min_partition_size)
    positions = example_positions(dataset, seed)
    clients = np.minimum((positions * num_clients).astype(np.int64), num_clients - 1)
    _check_min_size(
        clients,
        num_clients,
        min_partition_size,
        f"the iid split of {len(dataset)} examples",
        "use fewer clients, more data or a smaller partition_min_size" + _duplicates_note(positions),
    )
    return _select_clients(dataset, clients, num_clients)


def partition_dirichlet(
    dataset: Dataset,
    num_clients: int,
    alpha: float,
    label_column: str,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[Dataset]:
    """Label-skewed clients as in Hsu et al. (2019) / FedML: each label is shared among the clients by
    proportions drawn from Dir(alpha), so a small alpha gives clients few dominant labels and a large
    alpha approaches IID. An example goes to the client whose interval of its label's cumulative proportions
    holds the example's hash position u.

    If a client gets fewer than `min_partition_size` examples (default 1: no empty client) every label's
    proportions are drawn again (the next draw number), as Flower Datasets' `min_partition_size` does, at most
    MAX_DIRICHLET_DRAWS times, then it raises. `partition_dataset` reports the number of draws. A re-draw depends
    on the clients' sizes, so where one example decides whether a re-draw happens the split is not stable under
    adding or removing that example: inherent to a minimum size, and why the record reports the draws.
    Re-drawing also conditions the proportions on the sizes, a slight departure from plain Dir(alpha).
    """
    clients, _ = _dirichlet_clients(dataset, num_clients, alpha, label_column, seed, min_partition_size)
    return _select_clients(dataset, clients, num_clients)


def _dirichlet_clients(
    dataset: Dataset, num_clients: int, alpha: float, label_column: str, seed: int, min_partition_size: int
) -> tuple[np.ndarray, int]:
    """(client index of each example, draws used) for partition_dirichlet."""
    _check_sizes_possible(num_clients, len(dataset), min_partition_size)
    if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet_alpha must be a finite number > 0, got {alpha!r}")
    groups = _indices_by_value(_read_column(dataset, label_column, "label_column"))
    positions = example_positions(dataset, seed)
    concentration = np.full(num_clients, float(alpha))
    for draw in range(MAX_DIRICHLET_DRAWS):
        proportions = {label: _label_rng(seed, label, draw).dirichlet(concentration) for label in groups}
        clients = _place_each_label(groups, positions, proportions)
        sizes = np.bincount(clients, minlength=num_clients)
        if sizes.min() >= min_partition_size:
            return clients, draw + 1
    smallest = int(np.argmin(sizes))
    raise ValueError(
        f"the dirichlet partition left client_{smallest} with {sizes[smallest]} examples, fewer than "
        f"partition_min_size={min_partition_size}, in each of {MAX_DIRICHLET_DRAWS} draws of the label proportions "
        f"(num_clients={num_clients}, dirichlet_alpha={alpha}, {len(dataset)} examples; last draw's client sizes "
        f"{sizes.tolist()}); use a larger dirichlet_alpha, fewer clients or a smaller partition_min_size"
        + _duplicates_note(positions)
    )


def partition_by_label_proportions(
    dataset: Dataset,
    proportions: Sequence[Sequence[float]],
    label_column: str,
    seed: int = 0,
    min_partition_size: int = 1,
) -> list[Dataset]:
    """Clients with hand-chosen label mixes, FFA-LoRA style: row k of `proportions` is client k and column c
    the c-th label in sorted order. Each label's examples are shared among the clients in proportion to its
    column (placed by hash position, so the shares hold in expectation), and with balanced labels client k's
    label mix is its row. The proportions are the user's, so a client below `min_partition_size` raises."""
    matrix = parse_label_proportions(proportions)
    num_clients = matrix.shape[0]
    _check_sizes_possible(num_clients, len(dataset), min_partition_size, name="label_proportions rows")
    groups = _indices_by_value(_read_column(dataset, label_column, "label_column"))
    if matrix.shape[1] != len(groups):
        raise ValueError(
            f"label_proportions has {matrix.shape[1]} columns but label_column {label_column!r} has "
            f"{len(groups)} distinct labels {list(groups)}; give one column per label, in sorted label order"
        )
    columns = dict(zip(groups, matrix.T, strict=True))
    positions = example_positions(dataset, seed)
    clients = _place_each_label(groups, positions, columns)
    _check_min_size(
        clients,
        num_clients,
        min_partition_size,
        f"label_proportions on {len(dataset)} examples",
        "use more data, larger proportions for those rows or a smaller partition_min_size"
        + _duplicates_note(positions),
    )
    return _select_clients(dataset, clients, num_clients)


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


def example_positions(dataset: Dataset, seed: int) -> np.ndarray:
    """Each example's hash position u in [0, 1): BLAKE2b, keyed from the seed, of every column of the row in
    column order. It depends on the row's own content and the seed only, so adding or removing an example moves
    no other. Columns are read through Arrow a batch at a time, not row by row."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"the partition seed must be an integer >= 0, got {seed!r}")
    key = hashlib.blake2b(str(int(seed)).encode(), digest_size=32, person=b"hf_fedlora.part").digest()
    names = [_canonical_bytes(name) for name in dataset.column_names]
    arrow = dataset.with_format("arrow")
    digests = []
    for start in range(0, len(dataset), _HASH_BATCH_ROWS):
        table = arrow[start : start + _HASH_BATCH_ROWS]
        columns = [table.column(name).to_pylist() for name in dataset.column_names]
        for row in zip(*columns, strict=True):
            out: list[bytes] = []
            for name, value in zip(names, row, strict=True):
                out.append(name)
                _encode(value, out)
            digests.append(hashlib.blake2b(b"".join(out), digest_size=8, key=key).digest())
    top_53_bits = np.frombuffer(b"".join(digests), dtype="<u8") >> np.uint64(11)
    return top_53_bits.astype(np.float64) / 2.0**53


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
    min_partition_size: int = 1,
) -> ClientPartition:
    """Dispatch to one scheme from (command line) settings and name the clients.

    Returns a ClientPartition, an ordered dict: "client_0", "client_1", ... for the iid, dirichlet and
    label_proportions schemes, str(value) for the column scheme; its `draws` says how many Dirichlet draws were
    made (1 for every other scheme). For label-based schemes a missing `label_column` defaults to a "label" or
    "labels" column. For the label_proportions and column schemes `num_clients` may be None, otherwise it must
    match the number of rows / distinct values. Every client holds at least `min_partition_size` examples (the
    arguments' partition_min_size) or this raises; only the dirichlet scheme re-draws to get there.
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
        clients = partition_by_column(dataset, client_column)
        _check_sizes_possible(len(clients), len(dataset), min_partition_size, name="client_column values")
        small = {name: len(data) for name, data in clients.items() if len(data) < min_partition_size}
        if small:
            raise ValueError(
                f"client_column {client_column!r} gives clients with fewer than partition_min_size="
                f"{min_partition_size} examples: {small}; leave those clients' rows out or use a smaller "
                "partition_min_size"
            )
        return ClientPartition(clients)

    draws = 1
    if scheme == "iid":
        _require_num_clients(num_clients, scheme)
        parts = partition_iid(dataset, num_clients, seed, min_partition_size)
    elif scheme == "dirichlet":
        _require_num_clients(num_clients, scheme)
        label_column = _resolve_label_column(dataset, label_column, scheme)
        assignment, draws = _dirichlet_clients(
            dataset, num_clients, dirichlet_alpha, label_column, seed, min_partition_size
        )
        parts = _select_clients(dataset, assignment, num_clients)
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
        parts = partition_by_label_proportions(dataset, matrix, label_column, seed, min_partition_size)
    return ClientPartition(((f"client_{k}", part) for k, part in enumerate(parts)), draws=draws)


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


def _select_clients(dataset: Dataset, clients: np.ndarray, num_clients: int) -> list[Dataset]:
    """Ascending indices keep each client's examples in the original dataset order."""
    return [dataset.select(np.flatnonzero(clients == k).tolist()) for k in range(num_clients)]


def _canonical_bytes(value: object) -> bytes:
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _length(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _encode(value: object, out: list[bytes]) -> None:
    """Append a stable, type-tagged, length-prefixed serialisation of one value (a cell as Arrow's to_pylist
    gives it: int, float, str, bytes, bool, None, list, dict such as an image's {"bytes", "path"}, nested).
    A flat list of numbers (token ids, pixel rows) is packed as little-endian int64 or float64 in one call."""
    kind = type(value)
    if kind is list or kind is tuple:
        packed = _pack_numbers(value)
        if packed is not None:
            out += (packed[0], _length(len(value)), packed[1])
            return
        out += (b"[", _length(len(value)))
        for item in value:
            _encode(item, out)
    elif kind is str:
        data = value.encode("utf-8", "surrogatepass")
        out += (b"s", _length(len(data)), data)
    elif kind is bytes:
        out += (b"b", _length(len(value)), value)
    elif kind is bool:
        out.append(b"T" if value else b"F")
    elif kind is int:
        data = str(value).encode()
        out += (b"i", _length(len(data)), data)
    elif kind is float:
        out += (b"f", struct.pack("<d", value))
    elif value is None:
        out.append(b"N")
    elif kind is dict:
        out += (b"{", _length(len(value)))
        for field in sorted(value, key=str):
            _encode(str(field), out)
            _encode(value[field], out)
    else:  # datetime, Decimal, ...: their repr is deterministic
        data = f"{kind.__module__}.{kind.__qualname__}:{value!r}".encode()
        out += (b"?", _length(len(data)), data)


def _pack_numbers(values: list | tuple) -> tuple[bytes, bytes] | None:
    """(tag, little-endian bytes) of a flat list of int64s or of floats, or None for anything else."""
    for tag, code in ((b"Lq", "q"), (b"Ld", "d")):
        try:
            packed = array(code, values)
        except TypeError:  # not numbers of this kind (a float for "q", a str or list for both)
            continue
        except OverflowError:  # ints beyond int64: encoded one by one, exactly
            return None
        if sys.byteorder == "big":
            packed.byteswap()
        return tag, packed.tobytes()
    return None


def _label_rng(seed: int, label: int | str, draw: int) -> np.random.Generator:
    """The RNG of one label's proportions: from the seed, the label and the draw number only, so a new label
    or a new example changes no other label's proportions."""
    label_key = int.from_bytes(hashlib.blake2b(_canonical_bytes(label), digest_size=16).digest(), "little")
    return np.random.default_rng([int(seed), label_key, draw])


def _place_each_label(
    groups: dict[int | str, np.ndarray], positions: np.ndarray, proportions: Mapping[int | str, np.ndarray]
) -> np.ndarray:
    """Client index of each example: the client whose interval of its label's cumulative proportions holds u."""
    clients = np.empty(len(positions), dtype=np.int64)
    for label, indices in groups.items():
        shares = np.asarray(proportions[label], dtype=float)
        edges = np.cumsum(shares / shares.sum())
        edges[-1] = 1.0  # u < 1, so rounding in the sum never sends an example past the last client
        clients[indices] = np.searchsorted(edges, positions[indices], side="right")
    return clients


def _duplicates_note(positions: np.ndarray) -> str:
    """Say so when repeated rows shrink the data: identical rows always share a client."""
    distinct = len(np.unique(positions))
    if distinct == len(positions):
        return ""
    return f" (only {distinct} of the {len(positions)} rows are distinct, and identical rows always share a client)"


def _check_sizes_possible(num_clients: int, num_examples: int, min_size: int, name: str = "num_clients") -> None:
    _check_num_clients(num_clients, num_examples, name)
    if isinstance(min_size, bool) or not isinstance(min_size, numbers.Integral) or min_size < 1:
        raise ValueError(f"partition_min_size must be an integer >= 1, got {min_size!r}")
    if num_clients * min_size > num_examples:
        raise ValueError(
            f"partition_min_size={min_size} for {num_clients} clients needs {num_clients * min_size} examples, "
            f"but the dataset has {num_examples}; use fewer clients or a smaller partition_min_size"
        )


def _check_min_size(clients: np.ndarray, num_clients: int, min_size: int, split: str, fixes: str) -> None:
    """Raise, naming the clients, when a split that cannot be re-drawn leaves a client below the minimum."""
    sizes = np.bincount(clients, minlength=num_clients)
    small = [f"client_{k} ({sizes[k]})" for k in np.flatnonzero(sizes < min_size)]
    if small:
        raise ValueError(
            f"{split} left {', '.join(small)} with fewer than partition_min_size={min_size} examples "
            f"(client sizes {sizes.tolist()}); {fixes}"
        )
