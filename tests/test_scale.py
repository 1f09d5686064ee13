"""Cross-device scale: planning many heterogeneous clients on a calibration grid, and epsilon logging that only
recomputes the clients whose history changed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from tiny import fed_args, tiny_peft, toy_dataset

import hf_fedlora.privacy.engine as engine_module
from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.hub import CARD_NAME
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.calibration import grid_point

TARGET, DELTA = 4.0, 1e-7


def independent_rdp_epsilon(sigma: float, rate: float, steps: int, delta: float) -> float:
    """Google's dp_accounting RDP accountant, not Opacus's."""
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)) if rate < 1 else None
    accountant.compose(event or dp_event.GaussianDpEvent(sigma), steps)
    return accountant.get_epsilon(delta)


def cross_device_clients(num_clients: int, per_round: int, rounds: int, local_steps: int, seed: int = 0):
    """Dirichlet client sizes (at least the batch of 8) and each client's planned steps under a sampled schedule."""
    rng = np.random.default_rng(seed)
    sizes = 8 + rng.multinomial(60 * num_clients, rng.dirichlet(np.ones(num_clients)))
    participations = np.zeros(num_clients, dtype=int)
    for _ in range(rounds):
        participations[rng.choice(num_clients, per_round, replace=False)] += 1
    names = [f"client_{i}" for i in range(num_clients)]
    return dict(zip(names, sizes.tolist(), strict=True)), {
        name: int(local_steps * p) for name, p in zip(names, participations, strict=True)
    }


@pytest.mark.parametrize("ratio", [1.1, 1.25, 2.0])
def test_grid_point_is_at_or_above_the_client_and_within_one_ratio(ratio):
    rng = np.random.default_rng(0)
    for rate, steps in zip(rng.uniform(1e-4, 1.0, 500), rng.integers(1, 5000, 500), strict=True):
        grid_rate, grid_steps = grid_point(float(rate), int(steps), ratio)
        assert rate <= grid_rate < rate * ratio * (1 + 1e-12) and grid_rate <= 1.0
        assert steps <= grid_steps <= max(steps + 1, math.ceil(steps * ratio))
    assert grid_point(1.0, 1, ratio) == (1.0, 1)


def test_200_client_plan_is_quick_and_every_client_meets_its_target_per_an_independent_accountant():
    """200 Dirichlet-sized clients, 10 per round for 20 rounds: one search per occupied grid point (not per client),
    and every client's (sigma, own rate, own steps), sampled and worst-placed, is within the target per
    dp_accounting. Measured on the shared 2-core machine: about 10-30 s (RDP)."""
    sizes, steps = cross_device_clients(200, per_round=10, rounds=20, local_steps=3)
    privacy = FederatedPrivacy(
        target_epsilon=TARGET,
        target_delta=DELTA,
        noise_multiplier=None,
        clip_norm=1.0,
        accountant="rdp",
        calibration="per_client_grid",
    )
    started = time.perf_counter()
    privacy.plan(sizes, 8, steps, torch.device("cpu"))
    seconds = time.perf_counter() - started
    planned = {name: c for name, c in privacy.clients.items() if steps[name] > 0}
    points = {grid_point(c.sample_rate, steps[name], privacy.grid_ratio) for name, c in planned.items()}
    assert len(planned) > 100 and len({c.noise_multiplier for c in planned.values()}) == len(points) < len(planned)
    assert seconds < 300, f"planning 200 clients took {seconds:.0f} s"

    def slack(name: str) -> float:  # how far below its grid point a client sits (1: exactly on it)
        grid_rate, grid_steps = grid_point(planned[name].sample_rate, steps[name], privacy.grid_ratio)
        return planned[name].sample_rate / grid_rate * steps[name] / grid_steps

    worst = sorted(planned, key=slack, reverse=True)[:10]
    sample = list(np.random.default_rng(1).choice(sorted(planned), 15, replace=False))
    for name in worst + sample:
        client = planned[name]
        assert client.step_budget == steps[name]
        epsilon = independent_rdp_epsilon(client.noise_multiplier, client.sample_rate, steps[name], DELTA)
        assert epsilon <= TARGET, (name, epsilon)
    assert max(slack(name) for name in worst) > 0.97  # the worst-placed really are (almost) on their grid points
    # Clients never sampled run nothing and get no noise.
    assert all(privacy.clients[name].noise_multiplier == 0.0 for name in sizes if steps[name] == 0)


def test_grid_noise_is_at_least_the_exact_noise_and_not_much_more():
    """Grid calibration never gives a client less noise than its own exact calibration; the extra is bounded by
    what one grid step in rate costs (here under 30% for ratio 1.25)."""
    sizes = {"small": 37, "medium": 211, "large": 1499}
    steps = dict.fromkeys(sizes, 12)
    kwargs = dict(target_epsilon=TARGET, target_delta=DELTA, noise_multiplier=None, clip_norm=1.0, accountant="rdp")
    grid = FederatedPrivacy(calibration="per_client_grid", **kwargs)
    exact = FederatedPrivacy(calibration="per_client", **kwargs)
    for privacy in (grid, exact):
        privacy.plan(sizes, 8, steps, torch.device("cpu"))
    for name in sizes:
        ratio = grid.clients[name].noise_multiplier / exact.clients[name].noise_multiplier
        assert 0.99 <= ratio < 1.3, (name, ratio)  # 0.99: both searches stop within 1% of the minimum


def test_epsilon_log_recomputes_only_clients_whose_history_changed(monkeypatch):
    sizes = {f"client_{i}": 100 + i for i in range(50)}
    privacy = FederatedPrivacy(
        target_epsilon=None, target_delta=DELTA, noise_multiplier=1.0, clip_norm=1.0, accountant="rdp"
    )
    privacy.plan(sizes, 8, dict.fromkeys(sizes, 5), torch.device("cpu"))
    for name in sizes:
        privacy.record_step(name)
    computed = []
    real = engine_module.epsilon_from_history

    def counting(history, delta, accountant):
        computed.append(tuple(history))
        return real(history, delta, accountant)

    monkeypatch.setattr(engine_module, "epsilon_from_history", counting)
    first = privacy.max_epsilon()
    assert len(computed) == 50
    computed.clear()
    assert privacy.max_epsilon() == first and computed == []  # nothing changed: nothing recomputed
    for name in ("client_3", "client_17"):
        privacy.record_step(name)
    second = privacy.max_epsilon()
    assert len(computed) == 2 and second > first
    assert second == pytest.approx(real([(1.0, 8 / 103, 2)], DELTA, "rdp"))  # client_3 has the highest rate


def test_grid_calibration_through_the_trainer_is_recorded_and_on_the_card(tmp_path):
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_clients=4,
            clients_per_round=2,
            dp_target_epsilon=TARGET,
            dp_noise_calibration="per_client_grid",
        ),
        train_dataset={f"client_{i}": toy_dataset(n, seed=i) for i, n in enumerate((20, 45, 90, 160))},
    )
    trainer.train()
    report = trainer.privacy_report()
    assert report["noise_calibration"] == "per_client_grid" and report["calibration_grid_ratio"] == 1.25
    assert 0 < report["epsilon"] <= TARGET
    for client in report["clients"].values():
        if client["steps"]:
            independent = independent_rdp_epsilon(
                client["noise_multiplier"], client["sample_rate"], client["steps"], report["delta"]
            )
            assert independent <= TARGET
    trainer.save_model()
    card = (tmp_path / CARD_NAME).read_text()
    assert "geometric grid of sample rates and step counts" in card


@pytest.mark.parametrize(
    ("strategy", "steps", "logged_rounds"),
    [("steps", 1, [1, 2, 3, 4, 5, 6]), ("steps", 2, [2, 4, 6]), ("steps", 0.5, [3, 6]), ("no", 1, [6])],
)
def test_round_epsilon_follows_the_logging_cadence_and_the_final_one_is_what_was_spent(
    tmp_path, strategy, steps, logged_rounds
):
    """The epsilon spent so far is logged at Trainer's cadence (a round is a step) and always after the last
    round; rounds not logged skip the accountant call, and the final epsilon is the accountant's over all steps."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_rounds=6,
            local_steps=1,
            dp_noise_multiplier=1.0,
            logging_strategy=strategy,
            logging_steps=steps,
        ),
        train_dataset=toy_dataset(64),
    )
    trainer.train()
    history = trainer.federated_record()["round_history"]
    assert [entry["round"] for entry in history if "epsilon" in entry] == logged_rounds
    assert history[-1]["epsilon"] == trainer.privacy.max_epsilon() == trainer.privacy_report()["epsilon"]
    independent = max(
        independent_rdp_epsilon(1.0, c.sample_rate, 6, trainer.privacy.delta) for c in trainer.privacy.clients.values()
    )
    assert all(sum(n for _, _, n in c.history) == 6 for c in trainer.privacy.clients.values())  # no step unaccounted
    assert history[-1]["epsilon"] == pytest.approx(independent, rel=0.02)
