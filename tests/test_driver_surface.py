"""The public pieces other drivers (Flower) use to run one client of a federation outside the trainer."""

from __future__ import annotations

import pytest
import torch
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer
from hf_fedlora.methods import FFALoraConfig
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.client_level import ClientLevelPrivacy


def privacy() -> FederatedPrivacy:
    return FederatedPrivacy(target_epsilon=None, target_delta=1e-5, noise_multiplier=1.0, clip_norm=1.0, secret_seed=7)


def test_one_client_planned_alone_gets_its_federation_streams():
    """Planned by itself with its federation index, a client draws the very noise and batches it would draw when
    planned with everyone (so a one-client driver reproduces the in-process run)."""
    together, alone = privacy(), privacy()
    together.plan({"a": 40, "b": 60}, 8, {"a": 4, "b": 4}, torch.device("cpu"))
    alone.plan({"b": 60}, 8, {"b": 4}, torch.device("cpu"), client_indices={"b": 1}, total_examples=100)
    assert torch.equal(
        together.clients["b"].noise_generator.get_state(), alone.clients["b"].noise_generator.get_state()
    )
    assert together.sample_batch("b") == alone.sample_batch("b")
    default = privacy()
    default.plan({"b": 60}, 8, {"b": 4}, torch.device("cpu"))  # without the index it would be client 0's streams
    assert not torch.equal(
        default.clients["b"].noise_generator.get_state(), alone.clients["b"].noise_generator.get_state()
    )


def test_delta_is_checked_against_the_whole_federation():
    """delta must be below 1/N for all N examples; a client planning alone passes the federation's N."""
    alone = FederatedPrivacy(target_epsilon=None, target_delta=0.01, noise_multiplier=1.0, clip_norm=1.0)
    alone.plan({"b": 60}, 8, {"b": 4}, torch.device("cpu"))  # 0.01 < 1/60: fine for this client alone
    with pytest.raises(ValueError, match="N=200"):
        FederatedPrivacy(target_epsilon=None, target_delta=0.01, noise_multiplier=1.0, clip_norm=1.0).plan(
            {"b": 60}, 8, {"b": 4}, torch.device("cpu"), total_examples=200
        )


def test_client_unit_releases_per_round_survive_a_state_round_trip():
    """Client unit with two releases a round (DEeR): each release's noise is sqrt(2) larger; a restored aggregator
    state that forgot it would release with too little noise."""
    original = ClientLevelPrivacy(target_epsilon=None, target_delta=1e-5, noise_multiplier=1.0, clip_norm=1.0)
    original.plan(num_clients=4, clients_per_round=None, rounds=3, releases_per_round=2)
    restored = ClientLevelPrivacy(target_epsilon=None, target_delta=1e-5, noise_multiplier=1.0, clip_norm=1.0)
    restored.load_state_dict(original.state_dict())
    assert restored.releases_per_round == 2
    zero = {"w": torch.zeros(4000)}
    released = restored.aggregator(["w"]).release(zero, regulate=False)["w"]  # nobody's update: the noise / W
    assert float(released.std()) * restored.expected_clients == pytest.approx(2**0.5, rel=0.1)


def test_global_state_can_be_loaded_and_read(tmp_path):
    model = tiny_peft(FFALoraConfig)
    trainer = FederatedTrainer(model, fed_args(tmp_path), train_dataset=toy_dataset(40))
    state = trainer.global_state()
    key = next(k for k in state if "lora_B" in k)
    trainer.load_global_state({key: torch.ones_like(state[key])})
    assert torch.equal(trainer.global_state()[key], torch.ones_like(state[key]))
    state[key].zero_()  # a copy: changing it does not touch the trainer's
    assert trainer.global_state()[key].sum() > 0
    with pytest.raises(ValueError, match="not parameters of this adapter"):
        trainer.load_global_state({"nope": torch.zeros(1)})
    assert trainer.local_steps_for(40) == 2  # fed_args: local_steps=2
