"""Distributed noise under the client unit (issue "A Flower deployment people can trust", items 3 and 4): each client
adds its share of discrete Gaussian noise to its encoded update; the secure sum gives the aggregator only the noised
sum; the accounting counts only the shares of the fewest clients allowed to finish, checked against Google's
dp_accounting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import DeerConfig, FederatedTrainer, FFALoraConfig
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME
from hf_fedlora.privacy.client_level import ClientLevelPrivacy, clip_update
from hf_fedlora.privacy.distributed_noise import (
    ENCODED,
    RDP_ORDERS,
    DistributedNoisePlan,
    decode,
    encode,
    hadamard,
    plan_distributed_noise,
    rotation_signs,
    rounded_l2_bound,
    sample_discrete_gaussian,
    tau,
)
from hf_fedlora.verify import verify_adapter


def a_plan(noise_multiplier=1.0, bits=20, dimension=1024, min_shares=4, clients=4, clip_norm=1.0, granularity=None):
    from hf_fedlora.privacy.distributed_noise import granularity_for

    gamma = granularity or granularity_for(noise_multiplier, clip_norm, dimension, bits, clients, min_shares, 1)
    return DistributedNoisePlan(noise_multiplier, clip_norm, dimension, bits, gamma, min_shares, clients)


def random_updates(count: int, size: int, clip_norm: float, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    updates = []
    for _ in range(count):
        update = {
            "a.weight": torch.randn(size // 2, generator=generator),
            "b.weight": torch.randn(size // 4, 2, generator=generator),
        }
        updates.append(clip_update(update, clip_norm, "flat"))
    return updates


def secure_sum(uploads: list[torch.Tensor], plan: DistributedNoisePlan) -> torch.Tensor:
    total = torch.zeros(plan.dimension, dtype=torch.int64)
    for upload in uploads:
        total = torch.remainder(total + upload, plan.modulus)
    return total


# ----------------------------------------------------------------------------------------
# The encoding: the secure sum equals the plain sum within the quantisation
# ----------------------------------------------------------------------------------------
def test_the_rotation_is_orthogonal_and_its_own_inverse():
    vector = torch.randn(256, dtype=torch.float64)
    assert float(hadamard(vector).norm()) == pytest.approx(float(vector.norm()))
    assert torch.allclose(hadamard(hadamard(vector)), vector)


@pytest.mark.parametrize("bits", [12, 20, 32])
def test_the_secure_sum_equals_the_plain_sum_within_the_quantisation(bits):
    """No noise (sigma 0): what is left is the rounding, at most gamma per coordinate and client."""
    plan = a_plan(noise_multiplier=0.0, bits=bits, granularity=a_plan(bits=bits).granularity)
    updates = random_updates(4, 600, plan.clip_norm)
    signs = rotation_signs(7, 0, 0, plan.dimension)
    generator = torch.Generator().manual_seed(1)
    uploads = [encode(update, plan, signs, generator) for update in updates]
    assert all(u.dtype == torch.int64 and int(u.min()) >= 0 and int(u.max()) < plan.modulus for u in uploads)
    shapes = {key: tuple(t.shape) for key, t in updates[0].items()}
    decoded = decode(secure_sum(uploads, plan), plan, signs, shapes)
    for key in shapes:
        plain = sum(update[key] for update in updates)
        error = float((decoded[key] - plain).norm())
        assert error <= 4 * plan.granularity * math.sqrt(plan.dimension)  # each coordinate within gamma per client
        assert error < 0.05 * float(plain.norm()) or bits == 12


def test_an_update_over_the_clip_norm_or_the_plan_is_refused():
    plan = a_plan()
    signs = rotation_signs(0, 0, 0, plan.dimension)
    with pytest.raises(ValueError, match="above the clip norm"):
        encode({"w": torch.ones(10)}, plan, signs, None)
    with pytest.raises(ValueError, match="does not fit"):
        encode({"w": torch.zeros(plan.dimension + 1)}, plan, signs, None)


def test_conditional_rounding_keeps_every_upload_within_the_bound_the_accounting_uses():
    plan = a_plan(noise_multiplier=0.0, bits=12, granularity=a_plan(bits=12).granularity)
    signs = rotation_signs(3, 1, 0, plan.dimension)
    bound = rounded_l2_bound(plan.clip_norm / plan.granularity, plan.dimension, plan.beta)
    for update in random_updates(20, 1000, plan.clip_norm, seed=5):
        upload = encode(update, plan, signs, torch.Generator().manual_seed(2))
        signed = torch.remainder(upload + plan.modulus // 2, plan.modulus) - plan.modulus // 2
        assert float(signed.double().norm()) <= bound


# ----------------------------------------------------------------------------------------
# The noise: its total variance against the plan
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("std", [0.8, 1.5, 6.0])
def test_the_discrete_gaussian_sampler_has_the_exact_distributions_variance(std):
    values = torch.arange(-60, 61, dtype=torch.float64)
    weights = torch.exp(-(values**2) / (2 * std**2))
    exact = float((weights * values**2).sum() / weights.sum())
    draws = sample_discrete_gaussian(std, 200_000, torch.Generator().manual_seed(0)).double()
    assert abs(float(draws.mean())) < 0.02 * std + 0.01
    assert float(draws.var()) == pytest.approx(exact, rel=0.02)


@pytest.mark.parametrize("survivors", [3, 5])
def test_the_noise_of_the_surviving_shares_is_at_least_the_plans(survivors):
    """Zero updates from the clients that finished: the decoded sum is pure noise, of std sigma C when the planned
    minimum finished, and more (never less) when more did."""
    plan = DistributedNoisePlan(2.0, 0.5, 4096, 24, a_plan(2.0, 24, 4096, 3, 5, 0.5).granularity, 3, 5)
    signs = rotation_signs(1, 2, 0, plan.dimension)
    draws = []
    for draw in range(6):
        generators = [torch.Generator().manual_seed(100 * draw + client) for client in range(survivors)]
        uploads = [encode({"w": torch.zeros(4096)}, plan, signs, generator) for generator in generators]
        draws.append(decode(secure_sum(uploads, plan), plan, signs, {"w": (4096,)})["w"])
    std = float(torch.stack(draws).double().std())
    assert std == pytest.approx(plan.release_std * math.sqrt(survivors / plan.min_shares), rel=0.02)
    assert std >= 0.98 * plan.release_std


# ----------------------------------------------------------------------------------------
# The accounting, against Google's dp_accounting
# ----------------------------------------------------------------------------------------
def ddg_plan(**overrides) -> DistributedNoisePlan:
    kwargs = dict(
        target_epsilon=None,
        noise_multiplier=1.0,
        delta=1e-5,
        clip_norm=1.0,
        upload_size=3000,
        bits=32,
        clients=5,
        min_shares=5,
        rounds=10,
        releases_per_round=1,
        sensitivity_factor=1.0,
    )
    kwargs.update(overrides)
    return plan_distributed_noise(**kwargs)


def rdp_epsilon(noise_multiplier: float, compositions: int, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS))
    accountant.compose(dp_event.GaussianDpEvent(noise_multiplier), compositions)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("min_shares", [5, 3])  # without and with dropouts allowed
def test_epsilon_is_the_gaussian_at_the_surviving_noise_and_the_rounded_sensitivity_per_dp_accounting(min_shares):
    """On a fine grid tau vanishes: the bound is the Gaussian mechanism's at std sigma C (the shares of the fewest
    survivors) over the rounding-inflated sensitivity, composed over rounds, which dp_accounting computes."""
    plan = ddg_plan(noise_multiplier=1.3, clip_norm=0.7, min_shares=min_shares)
    assert tau(plan.share_std, plan.max_shares) < 1e-12
    sensitivity = rounded_l2_bound(plan.clip_norm / plan.granularity, plan.dimension) * plan.granularity
    assert sensitivity == pytest.approx(plan.clip_norm, rel=1e-3)
    independent = rdp_epsilon(plan.release_std / sensitivity, 10, 1e-5)
    assert plan.epsilon(10, 1e-5) == pytest.approx(independent, rel=1e-6)
    # the plan's sigma is the noise of the fewest survivors; more survivors only add noise
    more = ddg_plan(noise_multiplier=1.3, clip_norm=0.7)
    assert more.epsilon(10, 1e-5) == pytest.approx(plan.epsilon(10, 1e-5), rel=1e-6)


def test_a_coarse_grid_costs_epsilon_never_saves_it():
    """Few bits: a coarse grid inflates the sensitivity and tau adds; epsilon is above the Gaussian's."""
    coarse = ddg_plan(upload_size=50_000, bits=10, clients=20, min_shares=10, rounds=5)
    assert coarse.epsilon(5, 1e-5) > 1.05 * rdp_epsilon(coarse.noise_multiplier, 5, 1e-5)


def test_replace_one_doubles_the_sensitivity_per_dp_accounting():
    plan = ddg_plan(
        noise_multiplier=2.0,
        upload_size=100,
        clients=4,
        min_shares=4,
        rounds=3,
        releases_per_round=2,
        sensitivity_factor=2.0,
    )
    sensitivity = 2 * rounded_l2_bound(plan.clip_norm / plan.granularity, plan.dimension) * plan.granularity
    assert plan.epsilon(3, 1e-5) == pytest.approx(rdp_epsilon(plan.release_std / sensitivity, 6, 1e-5), rel=1e-6)


def test_calibration_meets_the_target_and_a_smaller_sigma_would_not():
    kwargs = dict(upload_size=20_000, bits=16, clients=10, min_shares=7, rounds=8)
    plan = ddg_plan(target_epsilon=4.0, noise_multiplier=None, **kwargs)
    assert plan.epsilon(8, 1e-5) <= 4.0
    lower = ddg_plan(noise_multiplier=plan.noise_multiplier - 0.01, **kwargs)
    assert lower.epsilon(8, 1e-5) > 4.0


# ----------------------------------------------------------------------------------------
# The aggregator's side
# ----------------------------------------------------------------------------------------
def distributed_privacy(**overrides) -> ClientLevelPrivacy:
    kwargs = dict(
        target_epsilon=None,
        target_delta=1e-5,
        noise_multiplier=1.0,
        clip_norm=1.0,
        secret_seed=3,
        noise_placement="distributed",
        relation="zero_out_one",
        secure_sum_bits=20,
    )
    kwargs.update(overrides)
    return ClientLevelPrivacy(**kwargs)


def test_a_dropout_within_the_plan_releases_and_one_more_releases_nothing():
    privacy = distributed_privacy()
    privacy.plan(4, None, rounds=2, releases_per_round=1, upload_size=300, min_clients=3)
    plan = privacy.distributed
    assert (plan.min_shares, plan.max_shares, privacy.expected_clients) == (3, 4, 4.0)
    start = {"w": torch.zeros(300)}
    uploads = [
        encode({"w": torch.full((300,), 0.05)}, plan, rotation_signs(9, 0, 0, plan.dimension), None) for _ in range(3)
    ]
    survivors = privacy.aggregator(["w"], 0, 0, public_seed=9)
    for upload in uploads:
        survivors.add({ENCODED: upload})
    released = survivors.release(start, regulate=False)["w"]
    # (sum of 3 updates + noise of std sigma C) / 4
    assert float(released.mean()) == pytest.approx(3 * 0.05 / 4, abs=4 * plan.release_std / 4 / math.sqrt(300))
    too_few = privacy.aggregator(["w"], 0, 0, public_seed=9)
    for upload in uploads[:2]:
        too_few.add({ENCODED: upload})
    with pytest.raises(RuntimeError, match="only 2 of the planned minimum 3 noise shares"):
        too_few.release(start, regulate=False)


def test_the_aggregator_refuses_an_upload_that_is_not_an_encoding():
    privacy = distributed_privacy()
    privacy.plan(4, None, rounds=1, releases_per_round=1, upload_size=10)
    aggregate = privacy.aggregator(["w"], 0, 0)
    with pytest.raises(ValueError, match="one encoded tensor"):
        aggregate.add({"w": torch.zeros(10)})
    with pytest.raises(ValueError, match="outside"):
        aggregate.add({ENCODED: torch.full((privacy.distributed.dimension,), -1, dtype=torch.int64)})


# ----------------------------------------------------------------------------------------
# The trainer: end to end, the record and the card, the refusals
# ----------------------------------------------------------------------------------------
def distributed_trainer(tmp_path, config_cls=FFALoraConfig, **overrides):
    args = dict(
        dp_unit="client",
        num_clients=4,
        num_rounds=3,
        local_steps=2,
        learning_rate=0.5,
        dp_target_epsilon=8.0,
        dp_clip_norm=0.05,
        dp_target_delta=1e-4,
        dp_noise_placement="distributed",
        dp_neighbouring_relation="zero_out_one",
        min_clients_per_round=3,
    )
    args.update(overrides)
    return FederatedTrainer(tiny_peft(config_cls), fed_args(tmp_path, **args), train_dataset=toy_dataset(200))


def test_a_run_with_distributed_noise_states_its_plan_the_trust_and_an_epsilon_dp_accounting_confirms(tmp_path):
    trainer = distributed_trainer(tmp_path)
    before = {key: tensor.clone() for key, tensor in trainer.federation.global_state.items()}
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    after = trainer.federation.global_state
    assert any(not torch.equal(before[key], after[key]) for key in before)  # it trained
    record = json.loads((tmp_path / "adapter" / FEDERATED_RECORD_NAME).read_text())
    privacy = record["privacy"]
    plan = DistributedNoisePlan.from_dict(privacy["distributed_noise"])
    assert privacy["noise_placement"] == "distributed" and privacy["secure_sum"] == "simulated in process"
    assert (plan.min_shares, plan.max_shares, plan.bits) == (3, 4, 20)
    assert privacy["epsilon"] == pytest.approx(plan.epsilon(3, 1e-4)) and privacy["epsilon"] <= 8.0
    sensitivity = rounded_l2_bound(plan.clip_norm / plan.granularity, plan.dimension) * plan.granularity
    assert privacy["epsilon"] == pytest.approx(rdp_epsilon(plan.release_std / sensitivity, 3, 1e-4), rel=1e-4)
    card = (tmp_path / "adapter" / CARD_NAME).read_text()
    assert "distributed noise (Kairouz, Liu and Steinke, 2021)" in card
    assert (
        "the aggregator learns only the noised sum" in card
        and "(3 of 4; dropouts are assumed not to depend on the clients' data)" in card
    )
    assert "neighbouring relation: zero out one client's data" in card and "The list of clients is public." in card
    assert "and its share of the noise" in card
    assert "simulated in one process" in card
    verified = verify_adapter(str(tmp_path / "adapter"))
    assert verified.problems == []
    assert verified.independent["federation"] <= privacy["epsilon"]  # the Gaussian at sigma: a lower bound
    assert "Distributed noise" in verified.covers[0]
    assert verified.not_covered[0].startswith("The clients: each was trusted to clip its update and add its noise")


def test_a_client_that_fails_within_min_clients_does_not_stop_the_round(tmp_path, monkeypatch):
    trainer = distributed_trainer(tmp_path, num_rounds=1)
    original = trainer.local_round

    failed = []

    def failing(name, *args, **kwargs):
        if name == list(trainer.client_datasets)[0]:
            failed.append(name)
            raise RuntimeError("client went away")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(trainer, "local_round", failing)
    trainer.train()
    assert failed and trainer.federation.rounds_done == 1


def test_two_failures_below_the_planned_shares_stop_before_anything_is_released(tmp_path, monkeypatch):
    trainer = distributed_trainer(tmp_path, num_rounds=1)
    original, names = trainer.local_round, list(trainer.client_datasets)
    before = {key: tensor.clone() for key, tensor in trainer.federation.global_state.items()}

    def failing(name, *args, **kwargs):
        if name in names[:2]:
            raise RuntimeError("client went away")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(trainer, "local_round", failing)
    with pytest.raises(RuntimeError, match="fewer than min_clients_per_round"):
        trainer.train()
    assert all(torch.equal(before[key], trainer.federation.global_state[key]) for key in before)


def test_distributed_noise_is_refused_where_it_does_not_hold(tmp_path):
    with pytest.raises(ValueError, match="dp_unit='client'"):
        fed_args(tmp_path, dp_target_epsilon=3.0, dp_noise_placement="distributed")
    with pytest.raises(ValueError, match="a client that left would take its noise share with it"):
        fed_args(tmp_path, dp_unit="client", dp_target_epsilon=3.0, dp_noise_placement="distributed")
    with pytest.raises(ValueError, match="a client that left would take its noise share with it"):
        ClientLevelPrivacy(
            target_epsilon=3.0, target_delta=1e-5, noise_multiplier=None, clip_norm=1.0, noise_placement="distributed"
        )
    with pytest.raises(ValueError, match="every client in every round"):
        fed_args(
            tmp_path,
            dp_unit="client",
            num_clients=4,
            clients_per_round=2,
            dp_target_epsilon=3.0,
            dp_noise_placement="distributed",
            dp_neighbouring_relation="zero_out_one",
        )
    with pytest.raises(ValueError, match="dp_noise_placement must be one of"):
        fed_args(tmp_path, dp_unit="client", dp_target_epsilon=3.0, dp_noise_placement="local")
    with pytest.raises(ValueError, match="at most 48"):
        fed_args(tmp_path, dp_unit="client", dp_target_epsilon=3.0, secure_sum_bits=60)
    trainer = distributed_trainer(tmp_path, DeerConfig)
    with pytest.raises(ValueError, match="isotropic noise"):
        trainer.train()
