"""Client-level DP as DP-FedAvg: each sampled client's round update clipped to C, the noise added ONCE to the sum by
the aggregator, the sum divided by the fixed expected count; one accountant over rounds; nothing published says which
clients there are, who took part, or how many."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import DeerConfig, FederatedTrainer, FFALoraConfig, RoLoraConfig
from hf_fedlora.federation.adapter_state import factor_of
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME
from hf_fedlora.privacy import client_level as client_level_module
from hf_fedlora.privacy.client_level import ClientLevelPrivacy, clip_update
from hf_fedlora.verify import verify_adapter


def client_level_trainer(tmp_path, config_cls=FFALoraConfig, **overrides):
    args = dict(
        dp_unit="client",
        num_clients=4,
        num_rounds=3,
        local_steps=2,
        learning_rate=0.5,
        dp_noise_multiplier=1.0,
        dp_clip_norm=0.05,
        dp_target_delta=1e-4,
    )
    args.update(overrides)
    return FederatedTrainer(tiny_peft(config_cls), fed_args(tmp_path, **args), train_dataset=toy_dataset(200))


def pld_epsilon(history, delta: float, relation: str) -> float:
    """Google's PLD accountant (independent of the Opacus accountants that trained)."""
    neighbours = {
        "add_or_remove_one": NeighboringRelation.ADD_OR_REMOVE_ONE,
        "replace_one": NeighboringRelation.REPLACE_ONE,
    }[relation]
    accountant = pld_privacy_accountant.PLDAccountant(neighbours)
    for sigma, rate, steps in history:
        event = dp_event.GaussianDpEvent(sigma)
        accountant.compose(dp_event.PoissonSampledDpEvent(rate, event) if rate < 1 else event, int(steps))
    return accountant.get_epsilon(delta)


def aggregator_privacy(**overrides) -> ClientLevelPrivacy:
    kwargs = dict(target_epsilon=None, target_delta=1e-5, noise_multiplier=2.0, clip_norm=1.0, secret_seed=3)
    kwargs.update(overrides)
    return ClientLevelPrivacy(**kwargs)


# ----------------------------------------------------------------------------------------
# The mechanism
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("took_part", [0, 1, 3, 4])
def test_the_noise_is_added_once_to_the_sum_whoever_took_part(took_part):
    """Zero updates from k clients: the release is the noise / W, with the same std for every k (the issue's
    attack read the number of participants off the noise energy, since each client added its own noise)."""
    privacy = aggregator_privacy()
    privacy.plan(num_clients=4, clients_per_round=2, rounds=1, releases_per_round=1)
    aggregate = privacy.aggregator(["w"])
    for _ in range(took_part):
        aggregate.add({"w": torch.zeros(20000)})
    released = aggregate.release({"w": torch.zeros(20000)}, regulate=False)["w"]
    assert privacy.expected_clients == 2
    assert float(released.std()) == pytest.approx(2.0 * 1.0 / 2, rel=0.03)  # sigma C / W, never depends on k


def test_the_sum_of_clipped_updates_is_divided_by_the_expected_count_not_by_who_took_part():
    privacy = aggregator_privacy(noise_multiplier=1e-12)
    privacy.plan(num_clients=8, clients_per_round=4, rounds=1, releases_per_round=1)
    aggregate = privacy.aggregator(["w"])
    updates = [torch.full((3,), 0.1), torch.full((3,), 5.0)]  # the second is far above C = 1: clipped here
    for update in updates:
        aggregate.add({"w": update})
    released = aggregate.release({"w": torch.ones(3)}, regulate=False)["w"]
    clipped = updates[1] / float(updates[1].norm())
    expected = torch.ones(3) + (updates[0] + clipped) / 4  # W = 4 expected, though 2 took part
    torch.testing.assert_close(released, expected, rtol=1e-6, atol=1e-6)


def test_the_aggregator_clips_whatever_a_client_sends():
    """The bound never rests on the client: an update sent unclipped is clipped by the aggregator."""
    privacy = aggregator_privacy(noise_multiplier=1e-12, clip_norm=0.5)
    privacy.plan(num_clients=2, clients_per_round=None, rounds=1, releases_per_round=1)
    aggregate = privacy.aggregator(["a", "b"])
    aggregate.add({"a": torch.full((4,), 10.0), "b": torch.full((2,), -10.0)})
    released = aggregate.release({"a": torch.zeros(4), "b": torch.zeros(2)}, regulate=False)
    norm = math.sqrt(sum(float(t.norm()) ** 2 for t in released.values())) * 2  # times W = 2
    assert norm == pytest.approx(0.5, rel=1e-5)


def test_clipping_helper_bounds_the_whole_update():
    update = {"a": torch.randn(5, 5) * 30, "b": torch.randn(7)}
    for clipping in ("flat", "per_layer"):
        clipped = clip_update(update, 0.2, clipping)
        assert math.sqrt(sum(float(t.norm()) ** 2 for t in clipped.values())) <= 0.2 * (1 + 1e-6)
    small = {"a": torch.full((2,), 1e-3)}
    torch.testing.assert_close(clip_update(small, 1.0, "flat")["a"], small["a"])


def test_the_accountant_steps_before_the_noise_is_drawn(tmp_path, monkeypatch):
    """A round is spent before any of its noise exists: a crash after the noise can over-count, never replay."""
    trainer = client_level_trainer(tmp_path, num_rounds=2)
    seen = []
    real = client_level_module.draw_noise

    def recording(*args, **kwargs):
        seen.append(trainer.privacy.rounds_run)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_level_module, "draw_noise", recording)
    trainer.train()
    tensors_per_release = len(seen) // 2
    assert seen == [1] * tensors_per_release + [2] * tensors_per_release


def test_a_round_update_is_clipped_by_the_client_before_it_leaves(tmp_path):
    trainer = client_level_trainer(tmp_path, num_rounds=1, dp_noise_multiplier=1e-9)
    releases = []
    local_round = trainer.local_round

    def recording(name, round_index, sub_round, steps):
        upload, losses = local_round(name, round_index, sub_round, steps)
        releases.append(math.sqrt(sum(float(t.norm()) ** 2 for t in upload.values())))
        return upload, losses

    trainer.local_round = recording
    trainer.train()
    assert releases and all(norm <= 0.05 * (1 + 1e-5) for norm in releases)
    assert max(releases) == pytest.approx(0.05, rel=1e-4)  # lr 0.5: the raw updates are larger than C


# ----------------------------------------------------------------------------------------
# The accounting and what is published
# ----------------------------------------------------------------------------------------
def test_epsilon_is_one_history_over_rounds_at_the_client_rate_per_an_independent_accountant(tmp_path, caplog):
    trainer = client_level_trainer(tmp_path, clients_per_round=2, dp_noise_multiplier=None, dp_target_epsilon=5.0)
    with caplog.at_level(logging.INFO, logger="hf_fedlora.trainer"):
        trainer.train()
    report = trainer.privacy_report()
    assert report["unit"] == "client" and report["neighbouring_relation"] == "add_or_remove_one"
    assert "unit: one client" in caplog.text
    assert report["sample_rate"] == 0.5 and report["expected_clients_per_round"] == 2 and report["rounds"] == 3
    assert report["history"] == [[report["noise_multiplier"], 0.5, 3]]
    independent = pld_epsilon(report["history"], 1e-4, "add_or_remove_one")
    assert independent - 0.02 <= report["epsilon"] <= 5.0
    assert report["clients"] == {}


def test_replace_one_accounts_twice_the_sensitivity_per_an_independent_accountant(tmp_path):
    trainer = client_level_trainer(
        tmp_path, dp_neighbouring_relation="replace_one", dp_noise_multiplier=None, dp_target_epsilon=4.0
    )
    trainer.train()
    report = trainer.privacy_report()
    assert report["neighbouring_relation"] == "replace_one" and report["sample_rate"] == 1.0
    independent = pld_epsilon(report["history"], 1e-4, "replace_one")
    add_remove = pld_epsilon(report["history"], 1e-4, "add_or_remove_one")
    assert independent > 1.5 * add_remove  # the same noise is worth much less under replace-one
    assert independent - 0.02 <= report["epsilon"] <= 4.0


def test_replace_one_with_client_sampling_is_refused_before_training(tmp_path):
    trainer = client_level_trainer(tmp_path, dp_neighbouring_relation="replace_one", clients_per_round=2)
    with pytest.raises(ValueError, match="replace_one.*full participation"):
        trainer.train()
    assert trainer._rounds_done == 0


def test_nothing_published_names_the_clients_or_says_who_or_how_many_took_part(tmp_path, caplog, capsys):
    """Every output of a client-unit run: logs, progress bars, report_to's logs, the record, the card, the privacy
    report. None holds a client name, a client size, or a per-round participant count; a client that fails leaves
    no trace either."""

    class FlakyTrainer(FederatedTrainer):
        def local_round(self, name, round_index, sub_round, steps):
            if name == "site_c" and round_index == 1:
                raise RuntimeError("site offline")
            return super().local_round(name, round_index, sub_round, steps)

    args = fed_args(
        tmp_path,
        dp_unit="client",
        num_clients=None,
        clients_per_round=2,
        num_rounds=4,
        local_steps=1,
        dp_noise_multiplier=1.0,
        dp_target_delta=1e-4,
        dp_secret_seed=4,  # reproducible secret sampling: site_c takes part in round 2, with others who finish
        min_clients_per_round=1,
        disable_tqdm=False,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="epoch",
    )
    sizes = {"site_a": 137, "site_b": 211, "site_c": 173, "site_d": 149}  # numbers that appear nowhere else
    clients = {name: toy_dataset(size, seed=index) for index, (name, size) in enumerate(sizes.items())}
    trainer = FlakyTrainer(tiny_peft(FFALoraConfig), args, train_dataset=clients)
    sampled, sample = [], trainer.privacy.sample_participants
    trainer.privacy.sample_participants = lambda names: sampled.append(sample(names)) or sampled[-1]
    with caplog.at_level(logging.DEBUG):
        trainer.train()
    assert "site_c" in sampled[1] and len(sampled[1]) > 1  # the failure really happened, and the round went on
    assert len({len(names) for names in sampled}) > 1  # the number taking part varied: there was something to hide
    trainer.save_model()
    captured = capsys.readouterr()
    record = json.loads((tmp_path / FEDERATED_RECORD_NAME).read_text())
    outputs = {
        "logs": caplog.text,
        "stdout": captured.out,
        "stderr (progress bars)": captured.err,
        "log history": json.dumps(trainer.state.log_history),
        "record": json.dumps(record),
        "card": (tmp_path / CARD_NAME).read_text(),
        "report": json.dumps(trainer.privacy_report()),
    }
    for where, text in outputs.items():
        assert "site_" not in text and "client_" not in text, where
        for size in sizes.values():
            assert not re.search(rf"(?<![\d.e-]){size}(?![\d.])", text), (where, size)
    for key in ("client_sizes", "schedule", "failed_clients", "steps_per_round", "client_label_histograms"):
        assert not record.get(key), key
    assert all("clients" not in entry for entry in record["round_history"] + trainer.state.log_history)
    assert "round 1:" not in captured.err  # no per-client progress bar (it would count the participants)


def test_the_example_unit_still_shows_its_public_participants(tmp_path, capsys):
    """The control for the test above: where participation is public the bars and counts are there."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig), fed_args(tmp_path, num_rounds=1, disable_tqdm=False), train_dataset=toy_dataset(40)
    )
    trainer.train()
    assert "round 1:" in capsys.readouterr().err
    assert trainer.federated_record()["round_history"][0]["clients"] == 2


@pytest.mark.parametrize("config_cls, releases", [(DeerConfig, 2), (RoLoraConfig, 1)])
def test_alternating_methods_release_only_the_trained_factor_with_the_noise_split(tmp_path, config_cls, releases):
    trainer = client_level_trainer(tmp_path, config_cls, num_rounds=2)
    released = []
    real = client_level_module.DPFedAvgSum.release

    def recording(self, global_state, regulate):
        released.append({factor_of(k) for k in self.keys})
        return real(self, global_state, regulate)

    client_level_module.DPFedAvgSum.release = recording
    try:
        trainer.train()
    finally:
        client_level_module.DPFedAvgSum.release = real
    assert len(released) == 2 * releases and all(len(factors - {"head"}) == 1 for factors in released)
    report = trainer.privacy_report()
    assert report["releases_per_round"] == releases and report["history"] == [[1.0, 1.0, 2]]


def test_deer_releases_get_sqrt_two_times_the_noise():
    privacy = aggregator_privacy()
    privacy.plan(num_clients=4, clients_per_round=None, rounds=1, releases_per_round=2)
    released = privacy.aggregator(["w"]).release({"w": torch.zeros(20000)}, regulate=False)["w"]
    assert float(released.std()) * 4 == pytest.approx(2.0 * math.sqrt(2), rel=0.03)


def test_verify_accepts_a_client_unit_record_and_checks_it_independently(tmp_path):
    trainer = client_level_trainer(tmp_path, clients_per_round=2, dp_noise_multiplier=None, dp_target_epsilon=5.0)
    trainer.train()
    trainer.save_model()
    report = verify_adapter(tmp_path)
    assert report.ok, report.problems
    assert report.independent["federation"] == pytest.approx(
        pld_epsilon(trainer.privacy_report()["history"], 1e-4, "add_or_remove_one"), rel=1e-6
    )


def test_continuing_composes_the_recorded_rounds(tmp_path):
    first = client_level_trainer(tmp_path / "a", num_rounds=2)
    first.train()
    config = first.model.peft_config["default"]
    second = FederatedTrainer(
        first.model,
        fed_args(tmp_path / "b", dp_unit="client", num_clients=4, num_rounds=1, local_steps=2, learning_rate=0.5,
                 dp_noise_multiplier=1.0, dp_clip_norm=0.05, dp_target_delta=1e-4),
        train_dataset=toy_dataset(200),
    )  # fmt: skip
    assert config.federated_record["privacy"]["rounds"] == 2
    second.train()
    assert second.privacy_report()["history"] == [[1.0, 1.0, 3]]


def test_continuing_on_another_split_is_refused(tmp_path):
    first = client_level_trainer(tmp_path / "a", num_rounds=1)
    first.train()
    with pytest.raises(ValueError, match="same clients"):
        FederatedTrainer(
            first.model,
            fed_args(tmp_path / "b", dp_unit="client", num_clients=2, dp_noise_multiplier=1.0, dp_target_delta=1e-4),
            train_dataset=toy_dataset(200),
        )


def test_the_card_states_the_relation_the_trust_and_the_fixed_count(tmp_path):
    trainer = client_level_trainer(tmp_path, clients_per_round=2, num_rounds=1)
    trainer.train()
    trainer.save_model()
    card = (tmp_path / CARD_NAME).read_text()
    assert "for every client (unit: one client; neighbouring relation: add or remove one client)" in card
    assert "Who must be trusted: the aggregator saw the clipped updates before the noise (central DP)" in card
    assert "divided it by the fixed expected number of clients per round, 2" in card
    assert "of which 2 took part in each round" not in card  # under Poisson sampling no fixed number does
    assert "mcmahan2018learning" in card and "abadi2016deep" not in card  # DP-FedAvg, not DP-SGD
