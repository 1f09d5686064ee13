from collections import Counter

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from hf_fedlora.federation.partition import (
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


def test_iid_sizes_differ_by_at_most_one():
    clients = partition_iid(make_dataset([0] * 10), num_clients=3, seed=0)
    assert sorted(len(client) for client in clients) == [3, 3, 4]
    assert_exact_cover(clients, 10)


def test_iid_one_client_per_example_is_allowed():
    clients = partition_iid(make_dataset([0] * 5), num_clients=5)
    assert [len(client) for client in clients] == [1] * 5


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


def test_huge_alpha_dirichlet_is_nearly_uniform():
    dataset = balanced(3, 300)
    clients = partition_dirichlet(dataset, num_clients=3, alpha=1e6, label_column="label", seed=0)
    for client in clients:
        assert len(client) == pytest.approx(300, abs=5)
        assert label_fractions(client, 3) == pytest.approx([1 / 3] * 3, abs=0.02)
        assert distance_from_uniform(client, 3) < 0.02


def test_dirichlet_empty_client_raises_instead_of_resampling():
    with pytest.raises(ValueError, match="dirichlet_alpha") as error:
        partition_dirichlet(balanced(2, 10), num_clients=20, alpha=0.001, label_column="label")
    assert "num_clients=20" in str(error.value)
    assert "client_" in str(error.value)


def test_label_proportions_reproduce_row_mixes():
    rows = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
    dataset = balanced(2, 300)
    clients = partition_by_label_proportions(dataset, rows, label_column="label", seed=0)
    assert_exact_cover(clients, len(dataset))
    for client, row in zip(clients, rows, strict=True):
        assert label_fractions(client, 2) == pytest.approx(row, abs=0.01)
    assert [len(client) for client in clients] == [200, 200, 200]


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
