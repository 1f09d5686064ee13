"""Continuing an adapter composes privacy per example: every example answers for every step of every run it was
in, whatever the clients are this time (issue: re-splitting 2 clients into 4 reported 3.99 where the composition
was 4.47)."""

from __future__ import annotations

import pytest
from datasets import concatenate_datasets
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.verify import independent_epsilon

DELTA = 1e-5


def trained_once(tmp_path, data, num_clients: int = 2):
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path / "first", num_clients=num_clients, num_rounds=2, dp_noise_multiplier=1.0),
        train_dataset=data,
    )
    trainer.train()
    return trainer


def continued(tmp_path, model, data, num_clients: int):
    trainer = FederatedTrainer(
        model,
        fed_args(tmp_path / "second", num_clients=num_clients, num_rounds=1, dp_noise_multiplier=1.0),
        train_dataset=data,
    )
    trainer.train()
    return trainer


def test_a_re_split_makes_every_client_answer_for_the_worst_earlier_client(tmp_path):
    data = toy_dataset(240)
    first = trained_once(tmp_path, data)
    earlier = {name: c["history"] for name, c in first.privacy_report()["clients"].items()}
    second = continued(tmp_path, first.model, data, num_clients=4)
    assert second.continued_from["composed"] == "worst earlier client"
    report = second.privacy_report()
    for name, client in report["clients"].items():
        own = [[1.0, second.privacy.clients[name].sample_rate, 2]]
        # Any of its examples may have been in either earlier client: the worst composition, independently.
        worst = max(independent_epsilon(history + own, DELTA) for history in earlier.values())
        assert client["epsilon"] >= worst - 0.02
        assert client["history"][-1] == own[0] and client["steps"] == sum(n for _, _, n in client["history"])
    first_max = max(c["epsilon"] for c in first.privacy_report()["clients"].values())
    assert report["epsilon"] > first_max
    second.save_model()
    card = (tmp_path / "second" / "README.md").read_text()
    assert "composes the worst earlier client's history with its own steps" in card


def test_the_same_split_composes_by_client(tmp_path):
    data = toy_dataset(240)
    first = trained_once(tmp_path, data)
    earlier = {name: c["history"] for name, c in first.privacy_report()["clients"].items()}
    second = continued(tmp_path, first.model, data, num_clients=2)
    assert second.continued_from["composed"] == "by client"
    for name, client in second.privacy_report()["clients"].items():
        (sigma, rate, steps) = earlier[name][0]
        assert earlier[name] == [[sigma, rate, 4]]  # 2 rounds x 2 local steps
        assert client["history"] == [[sigma, rate, 4 + 2]]  # its own earlier steps, then this run's


@pytest.mark.parametrize("change", ["add", "remove"])
def test_adding_or_removing_one_example_keeps_every_other_example_with_its_client(tmp_path, change):
    """The partition places each example by its content: with one example more (or less) the split, and so the
    composition by client, is still exact for every other example."""
    data = toy_dataset(240)
    first = trained_once(tmp_path, data)
    if change == "add":
        changed = concatenate_datasets([data, toy_dataset(1, seed=99)])
    else:
        changed = data.select(range(1, len(data)))
    second = continued(tmp_path, first.model, changed, num_clients=2)
    assert second.continued_from["composed"] == "by client"
    before = {name: {tuple(row) for row in d["input_ids"]} for name, d in first.client_datasets.items()}
    after = {name: {tuple(row) for row in d["input_ids"]} for name, d in second.client_datasets.items()}
    for name in before:
        kept = before[name] & set().union(*after.values())
        assert kept <= after[name]  # no example changed client


def test_ready_made_clients_answer_for_the_worst_earlier_client(tmp_path):
    """Clients given ready-made may hold anything: nobody can tell which earlier client their examples were in."""
    data = toy_dataset(240)
    first = trained_once(tmp_path, data)
    given = {"client_0": data.select(range(0, 120)), "client_1": data.select(range(120, 240))}
    second = FederatedTrainer(
        first.model,
        fed_args(tmp_path / "second", num_clients=None, num_rounds=1, dp_noise_multiplier=1.0),
        train_dataset=given,
    )
    assert second.continued_from["composed"] == "worst earlier client"
