import io
from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage

from hf_fedlora.federation.partition import (
    MAX_DIRICHLET_DRAWS,
    ClientPartition,
    example_positions,
    label_histogram,
    parse_label_proportions,
    partition_by_column,
    partition_by_label_proportions,
    partition_dataset,
    partition_dirichlet,
    partition_iid,
)


def make_dataset(labels, **extra_columns):
    return Dataset.from_dict({"idx": list(range(len(labels))), "label": list(labels), **extra_columns})


def balanced(num_labels, per_label):
    return make_dataset([label for label in range(num_labels) for _ in range(per_label)])


def indices(clients):
    return [client["idx"][:] for client in clients]


def assert_exact_cover(clients, num_examples):
    seen = [i for client in indices(clients) for i in client]
    assert sorted(seen) == list(range(num_examples))  # union is everything, and no example twice
    for client in indices(clients):
        assert client == sorted(client)  # original order kept


def label_fractions(client, num_labels):
    counts = Counter(client["label"][:])
    return [counts[label] / len(client) for label in range(num_labels)]


LP = "label_proportions"

ALL_SCHEMES = [
    dict(scheme="iid", num_clients=4),
    dict(scheme="dirichlet", num_clients=3, dirichlet_alpha=1.0),
    dict(scheme=LP, num_clients=None, label_proportions="[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]"),
]


@pytest.mark.parametrize("kwargs", ALL_SCHEMES, ids=lambda kwargs: kwargs["scheme"])
def test_each_scheme_is_deterministic_and_covers_every_example_once(kwargs):
    dataset = balanced(2, 30)
    first = partition_dataset(dataset, seed=3, **kwargs)
    again = partition_dataset(dataset, seed=3, **kwargs)
    other = partition_dataset(dataset, seed=4, **kwargs)
    assert list(first) == [f"client_{k}" for k in range(len(first))]
    assert indices(first.values()) == indices(again.values())
    assert indices(first.values()) != indices(other.values())
    assert_exact_cover(first.values(), len(dataset))


def test_iid_clients_are_near_equal_random_shares():
    """Each example lands in a uniformly random client (by its hash), so sizes are n/K within a few sqrt(n/K)."""
    clients = partition_iid(make_dataset([0] * 4000), num_clients=4, seed=0)
    assert_exact_cover(clients, 4000)
    for client in clients:
        assert len(client) == pytest.approx(1000, abs=4 * (4000 * 0.25 * 0.75) ** 0.5)


def test_iid_empty_client_raises_naming_it():
    """Placement by hash cannot promise one example per client: an empty client is refused, not left to fail later."""
    with pytest.raises(ValueError, match="partition_min_size=1") as error:
        partition_iid(make_dataset([0] * 5), num_clients=5, seed=0)
    assert "client_" in str(error.value) and "fewer clients" in str(error.value)


def distance_from_uniform(client, num_labels):
    """Total variation distance between a client's label mix and the uniform mix of a balanced dataset."""
    return sum(abs(share - 1 / num_labels) for share in label_fractions(client, num_labels)) / 2


def test_small_alpha_dirichlet_is_label_skewed():
    dataset = balanced(10, 30)
    clients = partition_dirichlet(dataset, num_clients=3, alpha=0.1, label_column="label", seed=0)
    assert_exact_cover(clients, len(dataset))
    for client in clients:
        assert distance_from_uniform(client, 10) > 0.4
        assert len(set(client["label"][:])) < 10  # some labels missing entirely


def test_huge_alpha_dirichlet_is_nearly_iid():
    """With alpha -> infinity every label's proportions are uniform, so nearly every example goes where the iid
    split (same seed, same hash positions) puts it."""
    dataset = balanced(3, 300)
    dirichlet = partition_dirichlet(dataset, num_clients=3, alpha=1e6, label_column="label", seed=0)
    iid = partition_iid(dataset, num_clients=3, seed=0)
    same = sum(len(set(a) & set(b)) for a, b in zip(indices(dirichlet), indices(iid), strict=True))
    assert same >= 0.99 * len(dataset)
    for client in dirichlet:
        assert distance_from_uniform(client, 3) < 0.1


def test_dirichlet_empty_client_is_redrawn_then_raises():
    """20 clients from 20 examples at alpha=0.001 leave a client empty in every draw: refused, naming the fixes."""
    with pytest.raises(ValueError, match="dirichlet_alpha") as error:
        partition_dirichlet(balanced(2, 10), num_clients=20, alpha=0.001, label_column="label")
    message = str(error.value)
    assert "num_clients=20" in message and "client_" in message
    assert f"each of {MAX_DIRICHLET_DRAWS} draws" in message and "partition_min_size" in message


def test_label_proportions_reproduce_row_mixes():
    """Placement by hash gives each client its row's label mix and its share of the data, up to sampling noise."""
    rows = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
    dataset = balanced(2, 3000)
    clients = partition_by_label_proportions(dataset, rows, label_column="label", seed=0)
    assert_exact_cover(clients, len(dataset))
    for client, row in zip(clients, rows, strict=True):
        assert label_fractions(client, 2) == pytest.approx(row, abs=0.03)
        assert len(client) == pytest.approx(2000, abs=120)


def test_label_proportions_columns_follow_sorted_string_labels():
    dataset = make_dataset(["pos", "neg"] * 20)  # sorted labels: neg, pos
    clients = partition_dataset(dataset, scheme="label_proportions", num_clients=2, label_proportions=[[1, 0], [0, 1]])
    assert set(clients["client_0"]["label"][:]) == {"neg"}
    assert set(clients["client_1"]["label"][:]) == {"pos"}


def test_string_labels_work_with_dirichlet():
    dataset = make_dataset(["cat", "dog", "eel"] * 20)
    clients = partition_dataset(dataset, scheme="dirichlet", num_clients=2, dirichlet_alpha=100.0)
    assert_exact_cover(clients.values(), len(dataset))
    assert set(label_histogram(clients["client_0"], "label")) == {"cat", "dog", "eel"}


def test_column_scheme_groups_by_client_id():
    dataset = make_dataset([0, 1, 0, 1, 1], user=[10, 2, 10, 2, 7])
    clients = partition_dataset(dataset, scheme="column", num_clients=None, client_column="user")
    assert list(clients) == ["2", "7", "10"]  # sorted by value, not as strings
    assert clients["2"]["idx"][:] == [1, 3]
    assert clients["7"]["idx"][:] == [4]
    assert clients["10"]["idx"][:] == [0, 2]
    assert list(partition_by_column(dataset, "user")) == ["2", "7", "10"]


def test_label_histogram_counts_and_sorts():
    dataset = make_dataset(["b", "a", "b", "c", "b"])
    assert label_histogram(dataset, "label") == {"a": 1, "b": 3, "c": 1}
    assert list(label_histogram(dataset, "label")) == ["a", "b", "c"]


def test_class_label_reads_as_int_and_label_column_defaults():
    features = Features({"idx": Value("int64"), "labels": ClassLabel(names=["neg", "pos"])})
    dataset = Dataset.from_dict({"idx": list(range(8)), "labels": [1, 0] * 4}, features=features)
    assert label_histogram(dataset, "labels") == {0: 4, 1: 4}
    clients = partition_dataset(
        dataset.with_format("numpy"),
        scheme="label_proportions",
        num_clients=None,
        label_proportions="[[1, 0], [0, 1]]",
    )  # no label_column: "labels" is found; the numpy format does not change how labels are read
    assert label_histogram(clients["client_0"], "labels") == {0: 4}
    assert label_histogram(clients["client_1"], "labels") == {1: 4}


def test_parse_label_proportions_accepts_json_and_lists():
    assert parse_label_proportions("[[0.1, 0.9], [0.9, 0.1]]").tolist() == [[0.1, 0.9], [0.9, 0.1]]
    assert parse_label_proportions([[1, 0], [0, 1]]).shape == (2, 2)


DATASET = make_dataset([0, 1] * 5, user=list(range(10)))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(scheme="iid", num_clients=0), "num_clients"),
        (dict(scheme="iid", num_clients=None), "num_clients"),
        (dict(scheme="iid", num_clients=11), "num_clients=11 but the dataset has 10 examples"),
        (dict(scheme="dirichlet", num_clients=11), "num_clients=11 but the dataset has 10 examples"),
        (dict(scheme="dirichlet", num_clients=2, dirichlet_alpha=0.0), "dirichlet_alpha"),
        (dict(scheme="dirichlet", num_clients=2, dirichlet_alpha=-1.0), "dirichlet_alpha"),
        (dict(scheme="dirichlet", num_clients=2, label_column="nope"), "label_column 'nope' is not a column"),
        (dict(scheme="fedavg", num_clients=2), "iid, dirichlet, label_proportions, column"),
        (dict(scheme="column", num_clients=None), "client_column"),
        (dict(scheme="column", num_clients=None, client_column="nope"), "client_column"),
        (dict(scheme="column", num_clients=3, client_column="user"), "num_clients=3"),
        (dict(scheme=LP, num_clients=None), "label_proportions"),
        (dict(scheme=LP, num_clients=None, label_proportions="[[0.5, 0.5"), "label_proportions"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[1, 0], [1]]), "rectangular"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[1, -1], [0, 1]]), ">= 0"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[0, 0], [1, 1]]), "rows [0]"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[0, 1], [0, 1]]), "columns [0]"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[1, 1, 1]]), "3 columns"),
        (dict(scheme=LP, num_clients=3, label_proportions=[[1, 0], [0, 1]]), "num_clients=3"),
        (dict(scheme=LP, num_clients=None, label_proportions=[[1, 1]] * 11), "rows=11"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as error:
        partition_dataset(DATASET, **kwargs)
    assert field in str(error.value)


def test_missing_default_label_column_lists_columns():
    dataset = Dataset.from_dict({"text": ["a", "b", "c"], "target": [0, 1, 0]})
    with pytest.raises(ValueError, match="label_column") as error:
        partition_dataset(dataset, scheme="dirichlet", num_clients=2)
    assert "'target'" in str(error.value)


def test_label_proportions_empty_client_is_named():
    with pytest.raises(ValueError, match="client_2"):
        partition_by_label_proportions(balanced(2, 2), [[1, 1], [1, 1], [0.01, 0.01]], label_column="label")


def test_non_scalar_labels_raise():
    dataset = Dataset.from_dict({"label": [[0, 1], [1]]})
    with pytest.raises(ValueError, match="label_column"):
        label_histogram(dataset, "label")


# ----------------------------------------------------------------------------------------
# Stability under adding or removing one example: the run's guarantee is the largest client
# epsilon only if the neighbouring dataset changes one client and no other.
# ----------------------------------------------------------------------------------------
STABLE_SCHEMES = [
    dict(scheme="iid", num_clients=4),
    dict(scheme="dirichlet", num_clients=4, dirichlet_alpha=0.5),
    dict(scheme=LP, num_clients=None, label_proportions="[[0.1, 0.9, 0.3], [0.9, 0.1, 0.3], [0.5, 0.5, 0.4]]"),
]


def texts_dataset(n=399, num_labels=3):
    """Unique rows of several column types, `idx` being content (not a position): a text classification set."""
    return Dataset.from_dict(
        {
            "idx": list(range(n)),
            "text": [f"review number {i}" for i in range(n)],
            "input_ids": [[101, i % 97, i // 97, 102] for i in range(n)],
            "label": [i % num_labels for i in range(n)],
        }
    )


def client_of(clients):
    """idx -> client name."""
    return {idx: name for name, data in clients.items() for idx in data["idx"][:]}


def new_row(idx, label):
    return {"idx": idx, "text": f"a new review {idx}", "input_ids": [101, 5, 7, 102], "label": label}


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("kwargs", STABLE_SCHEMES, ids=lambda kwargs: kwargs["scheme"])
def test_adding_one_example_moves_no_other(kwargs, seed):
    dataset = texts_dataset()
    before = client_of(partition_dataset(dataset, seed=seed, **kwargs))
    added = Dataset.from_list([new_row(10_000, 1)] + dataset.to_list())  # in front: every position shifts
    after = client_of(partition_dataset(added, seed=seed, **kwargs))
    assert set(after) == set(before) | {10_000}
    assert {idx: after[idx] for idx in before} == before


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("kwargs", STABLE_SCHEMES, ids=lambda kwargs: kwargs["scheme"])
def test_removing_one_example_moves_no_other(kwargs, seed):
    dataset = texts_dataset()
    before = client_of(partition_dataset(dataset, seed=seed, **kwargs))
    removed = dataset.select([i for i in range(len(dataset)) if i != 57])
    after = client_of(partition_dataset(removed, seed=seed, **kwargs))
    assert after == {idx: client for idx, client in before.items() if idx != 57}


def test_an_example_with_a_new_label_moves_no_other_under_dirichlet():
    """Each label's proportions come from (seed, label, draw) alone: a first example of a new label, which
    sorts before the others, changes no other label's proportions."""
    dataset = texts_dataset()
    kwargs = dict(scheme="dirichlet", num_clients=4, dirichlet_alpha=0.5, seed=3)
    before = client_of(partition_dataset(dataset, **kwargs))
    added = Dataset.from_list(dataset.to_list() + [new_row(10_000, -1)])
    after = client_of(partition_dataset(added, **kwargs))
    assert {idx: after[idx] for idx in before} == before


def test_identical_rows_share_a_client():
    """Placement is a function of content: the ten copies of each of ten distinct rows always travel together."""
    dataset = Dataset.from_dict({"text": [f"row {i % 10}" for i in range(100)], "label": [0] * 100})
    clients = partition_dataset(dataset, scheme="iid", num_clients=2, seed=0)
    groups = [Counter(data["text"][:]) for data in clients.values()]
    assert set(groups[0]).isdisjoint(groups[1])
    assert all(count == 10 for group in groups for count in group.values())


def test_a_client_left_empty_by_repeated_rows_says_so():
    dataset = Dataset.from_dict({"text": ["a b", "c d"] * 50, "label": [0, 1] * 50})
    with pytest.raises(ValueError, match="only 2 of the 100 rows are distinct"):
        partition_dataset(dataset, scheme="iid", num_clients=4)


def png_bytes(shade):
    buffer = io.BytesIO()
    PILImage.new("RGB", (2, 2), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_rows():
    return [
        {
            "image": {"bytes": png_bytes(shade), "path": None},
            "caption": caption,
            "input_ids": ids,
            "scores": scores,
            "patches": patches,
            "raw": raw,
            "note": note,
            "label": label,
        }
        for shade, caption, ids, scores, patches, raw, note, label in [
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 0),
            (1, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 0),  # one image byte differs
            (0, "a cat.", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 0),  # one character
            (0, "a cat", [1, 2, 4], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 0),  # one token
            (0, "a cat", [1, 2, 3], [0.5, 1.25], [[1, 2], [3]], b"\x00", None, 0),  # one float
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1], [2, 3]], b"\x00", None, 0),  # nesting
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x01", None, 0),  # one raw byte
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", "x", 0),  # a None filled in
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 1),  # the label
            (0, "a cat", [1, 2, 3], [0.5, 1.5], [[1, 2], [3]], b"\x00", None, 0),  # a copy of the first row
        ]
    ]


def test_rows_of_every_column_type_hash_by_their_content():
    features = Features(
        {
            "image": Image(),
            "caption": Value("string"),
            "input_ids": Sequence(Value("int32")),
            "scores": Sequence(Value("float64")),
            "patches": Sequence(Sequence(Value("int64"))),
            "raw": Value("binary"),
            "note": Value("string"),
            "label": Value("int64"),
        }
    )
    dataset = Dataset.from_list(mixed_rows(), features=features)
    positions = example_positions(dataset, seed=0)
    assert ((positions >= 0) & (positions < 1)).all()
    assert len(set(positions[:-1].tolist())) == len(positions) - 1  # any one change moves the position
    assert positions[-1] == positions[0]  # identical rows, identical positions
    assert (example_positions(dataset, seed=0) == positions).all()
    assert not np.isin(example_positions(dataset, seed=1), positions).any()
    reversed_rows = example_positions(dataset.select(range(len(dataset) - 1, -1, -1)), seed=0)
    assert (reversed_rows == positions[::-1]).all()  # a row's position is its own, wherever it sits
    assert (example_positions(dataset.with_format("torch"), seed=0) == positions).all()


PINNED_POSITION = 0.8892712260326224  # as first released; change it only with a note that every split changes


def test_the_hash_position_of_a_row_is_pinned():
    """The split of a dataset must not change between releases: a changed serialisation or key fails here."""
    dataset = Dataset.from_dict({"input_ids": [[101, 7592, 102]], "text": ["hello"], "label": [1]})
    assert example_positions(dataset, seed=42).tolist() == [pytest.approx(PINNED_POSITION, abs=1e-15)]


# ----------------------------------------------------------------------------------------
# Minimum client size
# ----------------------------------------------------------------------------------------
BINARY_8000 = make_dataset([i % 2 for i in range(8000)])


def test_dirichlet_redraws_until_every_client_reaches_the_minimum_and_counts_the_draws():
    """The issue's case: 8 clients, Dirichlet(0.5), 8,000 binary examples. Seed 0's first draw leaves a client
    under 100 examples; asked for 100, the split re-draws and says how many draws it took."""
    kwargs = dict(scheme="dirichlet", num_clients=8, dirichlet_alpha=0.5, seed=0)
    first = partition_dataset(BINARY_8000, **kwargs)
    assert isinstance(first, ClientPartition) and isinstance(first, dict) and first.draws == 1
    assert min(len(data) for data in first.values()) < 100
    redrawn = partition_dataset(BINARY_8000, min_partition_size=100, **kwargs)
    assert redrawn.draws > 1
    assert min(len(data) for data in redrawn.values()) >= 100
    assert_exact_cover(redrawn.values(), len(BINARY_8000))
    again = partition_dataset(BINARY_8000, min_partition_size=100, **kwargs)
    assert again.draws == redrawn.draws and indices(again.values()) == indices(redrawn.values())


def test_dirichlet_minimum_that_no_draw_meets_raises_naming_the_fixes():
    with pytest.raises(ValueError) as error:
        partition_dataset(BINARY_8000, scheme="dirichlet", num_clients=8, dirichlet_alpha=0.5, min_partition_size=900)
    message = str(error.value)
    assert "partition_min_size=900" in message and f"each of {MAX_DIRICHLET_DRAWS} draws" in message
    assert "client_" in message and "sizes [" in message
    assert (
        "larger dirichlet_alpha" in message and "fewer clients" in message and "smaller partition_min_size" in message
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scheme="iid", num_clients=4),
        dict(scheme=LP, num_clients=None, label_proportions=[[1, 1], [1, 1], [1, 1], [1, 1]]),
    ],
    ids=["iid", LP],
)
def test_iid_and_label_proportions_below_the_minimum_raise(kwargs):
    """Nothing to re-draw (iid) or the proportions are the user's: a client under the minimum is refused."""
    with pytest.raises(ValueError, match="partition_min_size=100") as error:
        partition_dataset(balanced(2, 200), min_partition_size=100, **kwargs)
    assert "client_" in str(error.value) and "client sizes [" in str(error.value)
    assert partition_dataset(balanced(2, 200), min_partition_size=60, **kwargs).draws == 1


def test_column_clients_below_the_minimum_raise():
    dataset = make_dataset([0] * 6, user=[1, 1, 1, 2, 2, 3])
    with pytest.raises(ValueError, match="partition_min_size=2") as error:
        partition_dataset(dataset, scheme="column", num_clients=None, client_column="user", min_partition_size=2)
    assert "{'3': 1}" in str(error.value)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_bad_min_partition_size_is_refused(value):
    with pytest.raises(ValueError, match="partition_min_size must be an integer >= 1"):
        partition_dataset(balanced(2, 20), scheme="iid", num_clients=2, min_partition_size=value)


def test_minimum_larger_than_the_data_allows_is_refused_before_any_draw():
    with pytest.raises(ValueError, match="needs 8008 examples, but the dataset has 8000"):
        partition_dataset(BINARY_8000, scheme="dirichlet", num_clients=8, min_partition_size=1001)


def test_training_arguments_validate_partition_min_size(tmp_path):
    from tiny import fed_args

    assert fed_args(tmp_path).partition_min_size is None and fed_args(tmp_path).effective_partition_min_size == 1
    private = fed_args(tmp_path, dp_noise_multiplier=1.0, per_device_train_batch_size=16, gradient_accumulation_steps=6)
    assert private.effective_partition_min_size == 96  # under DP a smaller client's Poisson rate would exceed 1
    assert fed_args(tmp_path, partition_min_size=50).effective_partition_min_size == 50
    with pytest.raises(ValueError, match="partition_min_size must be an integer >= 1, got 0"):
        fed_args(tmp_path, partition_min_size=0)


def test_the_issues_split_trains_under_dp_instead_of_being_refused(tmp_path):
    """8 Dirichlet(0.5) clients of 8,000 binary examples left a client with 19 and a DP run refused to start: the
    minimum size defaults to the logical batch under DP, the proportions are re-drawn, and the record says so."""
    from tiny import fed_args, tiny_peft

    from hf_fedlora import FederatedTrainer, FFALoraConfig

    data = BINARY_8000.map(lambda row, i: {"input_ids": [1 + i % 60, 2], "attention_mask": [1, 1]}, with_indices=True)
    args = fed_args(
        tmp_path,
        num_clients=8,
        partition="dirichlet",
        dirichlet_alpha=0.5,
        seed=0,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=6,
        dp_target_epsilon=8.0,
        dp_target_delta=1e-6,
    )
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=data)
    assert min(len(client) for client in trainer.client_datasets.values()) >= 96
    partition = trainer.federated_record()["partition"]
    assert partition["min_size"] == 96 and partition["draws"] == 2  # seed 0: the first draw left a client short
