"""Secure aggregation of the weighted mean (issue "A Flower deployment people can trust", item 2): each client's
update clipped per coordinate, weighted, rounded to a grid modulo 2^bits; the sum decodes to FedAvg within the
quantisation; the mean is over the clients whose encodings arrived. In process the secure sum is simulated; the
Flower run (tests/test_flower.py) must give the same adapter."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.federation.adapter_state import weighted_average
from hf_fedlora.federation.secure_mean import ENCODED, SHARES, SUMMED, SecureMeanEncoding, SecureMeanSum
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME


def an_encoding(global_state, weights, bits=20, clip_range=1.0):
    return SecureMeanEncoding.plan(
        global_state,
        list(global_state),
        weights,
        bits=bits,
        clip_range=clip_range,
        public_seed=0,
        round_index=0,
        sub_round=0,
    )


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "b.weight": scale * torch.randn(6, 4, generator=generator),
        "head.bias": scale * torch.randn(3, generator=generator),
    }


@pytest.mark.parametrize("bits", [16, 20, 32])
@pytest.mark.parametrize("finished", [[0, 1, 2, 3], [0, 2, 3]], ids=["everyone", "one_dropped"])
def test_the_secure_mean_is_fedavg_of_the_clients_that_finished_within_the_quantisation(bits, finished):
    global_state = random_state(0)
    uploads = {f"c{i}": {k: v + random_state(10 + i, 0.1)[k] for k, v in global_state.items()} for i in range(4)}
    weights = {"c0": 50.0, "c1": 10.0, "c2": 30.0, "c3": 7.0}
    encoding = an_encoding(global_state, weights, bits)
    secure = SecureMeanSum(encoding)
    for index in finished:
        secure.add(encoding.encode(f"c{index}", index, uploads[f"c{index}"], global_state))
    released = secure.release(global_state)
    names = [f"c{index}" for index in finished]
    plain = weighted_average([uploads[n] for n in names], [weights[n] for n in names])
    share = sum(weights[n] for n in names) / encoding.total_weight
    bound = len(finished) * encoding.granularity / share + 1e-6  # one grid step of rounding per client, float32
    for key in plain:
        error = float((released[key].double() - plain[key].double()).abs().max())
        assert error <= bound, (key, error, bound)
        assert not torch.equal(released[key], global_state[key])


def test_an_encoded_upload_is_residues_and_a_secure_sum_result_adds_the_same():
    global_state = random_state(0)
    weights = {"a": 1.0, "b": 2.0}
    encoding = an_encoding(global_state, weights)
    encoded = [encoding.encode(name, i, random_state(5 + i), global_state)[ENCODED] for i, name in enumerate(weights)]
    assert all(e.dtype == torch.int64 and int(e.min()) >= 0 and int(e.max()) < encoding.modulus for e in encoded)
    one_by_one, at_once = SecureMeanSum(encoding), SecureMeanSum(encoding)
    for e in encoded:
        one_by_one.add({ENCODED: e})
    at_once.add({SUMMED: torch.remainder(encoded[0] + encoded[1], encoding.modulus), SHARES: torch.tensor(2)})
    for key, tensor in one_by_one.release(global_state).items():
        assert torch.equal(tensor, at_once.release(global_state)[key])


def test_a_coordinate_beyond_the_range_is_clipped_to_it():
    global_state = {"w": torch.zeros(3)}
    encoding = an_encoding(global_state, {"only": 1.0}, clip_range=0.5)
    secure = SecureMeanSum(encoding)
    secure.add(encoding.encode("only", 0, {"w": torch.tensor([2.0, -0.25, -7.0])}, global_state))
    assert torch.allclose(secure.release(global_state)["w"], torch.tensor([0.5, -0.25, -0.5]), atol=1e-5)


def test_the_encoding_travels_as_a_dict_and_refuses_a_foreign_upload():
    global_state = random_state(0)
    encoding = an_encoding(global_state, {"a": 1.0, "b": 1.0})
    assert SecureMeanEncoding.from_dict(json.loads(json.dumps(encoding.to_dict()))) == encoding
    with pytest.raises(ValueError, match="not this sub-round's"):
        encoding.encode("a", 0, {"other": torch.zeros(2)}, global_state)
    with pytest.raises(ValueError, match="one encoded tensor"):
        SecureMeanSum(encoding).add({"b.weight": torch.zeros(6, 4)})
    with pytest.raises(ValueError, match="too few"):
        _ = an_encoding(global_state, {str(i): 1.0 for i in range(200)}, bits=8).granularity


# ----------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------
def trainer_with(tmp_path, **overrides):
    args = dict(num_clients=3, num_rounds=2, local_steps=2, learning_rate=0.05, dp_secret_seed=7)
    args.update(overrides)
    return FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, **args), train_dataset=toy_dataset(120))


@pytest.mark.parametrize("private", [False, True], ids=["non_private", "example_level_dp"])
def test_training_with_secure_aggregation_matches_plain_fedavg_within_the_quantisation(tmp_path, private):
    dp = dict(dp_target_epsilon=8.0, dp_target_delta=1e-4) if private else {}
    plain = trainer_with(tmp_path / "plain", **dp)
    plain.train()
    secure = trainer_with(tmp_path / "secure", secure_aggregation=True, secure_sum_bits=32, **dp)
    secure.train()
    for key, tensor in plain.federation.global_state.items():
        torch.testing.assert_close(secure.federation.global_state[key], tensor, rtol=0, atol=1e-5)
    assert any(t.abs().sum() > 0 for k, t in plain.federation.global_state.items() if "lora_B" in k)
    if private:
        assert secure.privacy_report()["clients"] == plain.privacy_report()["clients"]
    secure.save_model(str(tmp_path / "adapter"))
    record = json.loads((tmp_path / "adapter" / FEDERATED_RECORD_NAME).read_text())
    assert record["secure_aggregation"] == {"sum": "simulated in process", "clip_range": 1.0, "bits": 32}
    card = (tmp_path / "adapter" / CARD_NAME).read_text()
    assert "Secure aggregation: the server averaged the uploads through a secure sum (simulated in process)" in card


def test_secure_aggregation_is_refused_where_the_aggregator_must_see_the_updates(tmp_path):
    with pytest.raises(ValueError, match="dp_noise_placement='distributed'"):
        fed_args(tmp_path, dp_unit="client", dp_target_epsilon=3.0, secure_aggregation=True)
    with pytest.raises(ValueError, match="secure_aggregation_range must be > 0"):
        fed_args(tmp_path, secure_aggregation=True, secure_aggregation_range=0.0)
