"""Differential privacy: noise, clipping, accounting, calibration and budget guards, checked end to end."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from datasets import Dataset
from opacus.accountants import PRVAccountant, RDPAccountant
from peft import get_peft_model
from tiny import fed_args, tiny_peft, toy_dataset
from torch import nn

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, FFALoraConfig
from hf_fedlora.privacy import calibrate_noise_multiplier, epsilon_from_history

INDEPENDENT_ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
class Regressor(nn.Module):
    """A tiny regression model: its per-example gradients grow without bound with the input and target scale."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x, y=None):
        prediction = self.head(torch.relu(self.body(x))).squeeze(-1)
        loss = None if y is None else ((prediction - y) ** 2).mean()
        return {"loss": loss, "logits": prediction}


def regressor_peft(seed: int = 0):
    torch.manual_seed(seed)
    return get_peft_model(Regressor(), FFALoraConfig(r=4, target_modules=["body"], modules_to_save=["head"]))


def regression_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (centred far from zero, so the examples' gradients point the same way)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=generator), 10 + torch.randn(n, generator=generator)


def regression_dataset(x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return Dataset.from_dict({"x": x.tolist(), "y": y.tolist()})


def plan_one_step(trainer: FederatedTrainer) -> None:
    """Do what `train()` does before its first step (prepare the shards, fix each client's noise) for one step."""
    clients = trainer._clients_ready_for_training()
    trainer.privacy.plan(
        {name: len(data) for name, data in clients.items()},
        trainer.args.per_device_train_batch_size,
        dict.fromkeys(clients, 1),
        trainer.args.device,
    )


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[name].flatten().float() for name in sorted(state)])


def global_update(trainer: FederatedTrainer, start: dict[str, torch.Tensor]) -> torch.Tensor:
    """The global adapter's change since `start`, over every trainable tensor, as one vector."""
    return flat({name: trainer.global_state()[name] - start[name] for name in start})


def copy_state(trainer: FederatedTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.global_state().items()}


def independent_epsilon(history, delta: float, accountant: str) -> float:
    fresh = INDEPENDENT_ACCOUNTANTS[accountant]()
    fresh.history = [tuple(entry) for entry in history]
    return float(fresh.get_epsilon(delta=delta))


def record_batch_sizes(trainer: FederatedTrainer) -> list[int]:
    """Spy on the trainer's local steps: the returned list fills with each step's batch size."""
    sizes: list[int] = []
    local_step = trainer._local_step

    def spy(data, indices, optimizer):
        sizes.append(len(indices))
        return local_step(data, indices, optimizer)

    trainer._local_step = spy
    return sizes


# ----------------------------------------------------------------------------------------
# 1. Noise is really added, at the promised scale
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_noise_is_added_with_std_sigma_times_clip_over_expected_batch(tmp_path, clipping):
    """One DP-SGD step moves the adapter by the clipped mean gradient plus N(0, (sigma*C/B)^2) per coordinate,
    however the examples are clipped."""
    sigma, clip, batch, lr = 20.0, 0.5, 8, 1.0
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig, r=16),  # 4 x 16 x 16 lora_B coordinates plus the head: enough for a std
        fed_args(
            tmp_path,
            num_clients=1,
            dp_secret_seed=0,  # its first Poisson batch holds 12 examples, far from the expected 8
            per_device_train_batch_size=batch,
            optim="sgd",
            learning_rate=lr,
            dp_noise_multiplier=sigma,
            dp_clip_norm=clip,
            dp_clipping=clipping,
        ),
        train_dataset=toy_dataset(64),
    )
    plan_one_step(trainer)
    batch_sizes = record_batch_sizes(trainer)
    sampler = trainer.privacy.clients["client_0"].sampling_generator
    same_batch = sampler.get_state()

    noisy, _ = trainer.local_round("client_0", 0, 0, 1)
    sampler.set_state(same_batch)
    noisy_again, _ = trainer.local_round("client_0", 0, 0, 1)
    sampler.set_state(same_batch)
    trainer.privacy.clients["client_0"].noise_multiplier = 0.0  # the same DP optimizer, clipping only
    clean, _ = trainer.local_round("client_0", 0, 0, 1)

    assert batch_sizes[0] == batch_sizes[1] == batch_sizes[2] > 0
    # Precondition: the Poisson batch is far from its expectation, so dividing by it would be caught.
    assert abs(batch_sizes[0] - batch) / batch > 0.3
    assert set(noisy) == set(clean) and any("lora_B" in name for name in noisy)
    noise = (flat(noisy) - flat(clean)) / lr
    expected_std = sigma * clip / batch
    assert noise.numel() > 1000
    assert noise.std().item() == pytest.approx(expected_std, rel=0.1)
    assert abs(noise.mean().item()) < 4 * expected_std / noise.numel() ** 0.5
    assert all(not torch.equal(noisy[name], clean[name]) for name in noisy)  # every trained tensor is noised
    # Fresh noise every step, not a fixed offset.
    assert not torch.allclose(flat(noisy), flat(noisy_again))
    # The noise-free part is the clipped mean step: at most C per sampled example, over B.
    start = flat({name: trainer.global_state()[name] for name in clean})
    assert 0 < (flat(clean) - start).norm() <= clip * batch_sizes[0] / batch + 1e-5


# ----------------------------------------------------------------------------------------
# 2. Clipping bounds what one example can do
# ----------------------------------------------------------------------------------------
def one_step_update(
    tmp_path, dataset: Dataset, *, clip: float, private: bool = True, clipping: str = "flat"
) -> torch.Tensor:
    """The global adapter's change after one round of one SGD step (lr 1) on a single client holding `dataset`."""
    dp = dict(dp_noise_multiplier=1e-6, dp_clip_norm=clip, dp_clipping=clipping) if private else dict(max_grad_norm=0.0)
    trainer = FederatedTrainer(
        regressor_peft(),
        fed_args(
            tmp_path,
            num_clients=1,
            num_rounds=1,
            local_steps=1,
            per_device_train_batch_size=len(dataset),  # sample rate 1: every example is in the batch
            optim="sgd",
            learning_rate=1.0,
            **dp,
        ),
        train_dataset=dataset,
    )
    start = copy_state(trainer)
    trainer.train()
    return global_update(trainer, start)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_one_outlier_moves_the_update_by_at_most_two_clip_norms_over_batch(tmp_path, clipping):
    """Per-example clipping (all trainable tensors together, or each to C/sqrt(P)): an outlier changes the
    update by <= 2C/B."""
    clip, n = 0.1, 16
    x, y = regression_data(n)
    x_outlier, y_outlier = x.clone(), y.clone()
    x_outlier[0], y_outlier[0] = x[0] * 1000, 1e6  # a gradient many orders of magnitude above C

    normal = one_step_update(tmp_path / "normal", regression_dataset(x, y), clip=clip, clipping=clipping)
    outlier = one_step_update(
        tmp_path / "outlier", regression_dataset(x_outlier, y_outlier), clip=clip, clipping=clipping
    )

    tolerance = 1e-4
    for update in (normal, outlier):
        assert update.norm() <= clip * n / n + tolerance  # n examples in the batch, expected batch size n
    # Aligned gradients: the bound is nearly reached, so clipping each tensor to C (not C/sqrt(P)) would break it.
    assert normal.norm() > 0.5 * clip
    assert 0 < (outlier - normal).norm() <= 2 * clip / n + tolerance

    # Without DP the same outlier dominates the update: the bound above is the clipping's doing.
    plain = one_step_update(tmp_path / "plain", regression_dataset(x, y), clip=clip, private=False)
    plain_outlier = one_step_update(
        tmp_path / "plain_outlier", regression_dataset(x_outlier, y_outlier), clip=clip, private=False
    )
    assert (plain_outlier - plain).norm() > 1000 * clip


# ----------------------------------------------------------------------------------------
# 3. Reported epsilon = an independent accountant on the recorded history
# ----------------------------------------------------------------------------------------
def test_default_accountant_is_prv():
    """Without dp_accountant, runs are accounted with PRV (Opacus's default, the tighter bound)."""
    default = {f.name: f.default for f in dataclasses.fields(FederatedTrainingArguments)}["dp_accountant"]
    assert default == "prv"


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_reported_epsilon_is_reproduced_by_an_independent_accountant(tmp_path, accountant):
    """Every client's epsilon is what a fresh Opacus accountant gives on its recorded (sigma, q, steps) history."""
    target, rounds, local_steps = 3.0, 2, 1
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_rounds=rounds,
            local_steps=local_steps,
            dp_target_epsilon=target,
            dp_accountant=accountant,
        ),
        train_dataset=toy_dataset(200),
    )
    output = trainer.train()
    report = trainer.privacy_report()

    assert report["private"] is True
    assert report["unit"] == "example"
    assert report["accountant"] == accountant
    assert report["delta"] == 1e-5
    assert set(report["clients"]) == {"client_0", "client_1"}
    for name, client in report["clients"].items():
        assert client["epsilon"] == independent_epsilon(client["history"], report["delta"], accountant)
        assert client["steps"] == rounds * local_steps == trainer.privacy.clients[name].step_budget
        assert sum(steps for _, _, steps in client["history"]) == client["steps"]
        assert all(sigma == client["noise_multiplier"] for sigma, _, _ in client["history"])
        assert all(q == 8 / client["num_examples"] for _, q, _ in client["history"])
    assert report["epsilon"] == max(client["epsilon"] for client in report["clients"].values())
    assert 0 < report["epsilon"] <= target
    assert output.metrics["epsilon"] == report["epsilon"]


# ----------------------------------------------------------------------------------------
# 4. Per-client calibration
# ----------------------------------------------------------------------------------------
CALIBRATION_STEPS = 2


def calibrated_report(tmp_path, calibration: str, target: float) -> dict:
    """Train a small (64) and a large (256 examples) client to `target` and return the privacy report."""
    small, large = toy_dataset(64), toy_dataset(256, seed=1)
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_clients=None,
            num_rounds=1,
            local_steps=CALIBRATION_STEPS,
            dp_target_epsilon=target,
            dp_noise_calibration=calibration,
        ),
        train_dataset=[small, large],
    )
    trainer.train()
    return trainer.privacy_report()


def test_each_client_gets_its_own_noise_just_meeting_the_target(tmp_path):
    """Per-client calibration: the larger client needs less noise, and every client ends just under the target."""
    target = 2.0
    report = calibrated_report(tmp_path, "per_client", target)
    small, large = report["clients"]["client_0"], report["clients"]["client_1"]
    assert (small["num_examples"], large["num_examples"]) == (64, 256)
    assert large["noise_multiplier"] < small["noise_multiplier"]
    assert report["noise_calibration"] == "per_client"
    for client in (small, large):
        assert 0.95 * target <= client["epsilon"] <= target


def test_shared_calibration_gives_everyone_the_worst_placed_clients_noise(tmp_path):
    """dp_noise_calibration='shared': one sigma for all, the largest per-client one; others then spend less."""
    target = 2.0
    report = calibrated_report(tmp_path, "shared", target)
    small, large = report["clients"]["client_0"], report["clients"]["client_1"]
    own = {
        name: calibrate_noise_multiplier(target, report["delta"], client["sample_rate"], CALIBRATION_STEPS, "rdp")
        for name, client in report["clients"].items()
    }
    assert own["client_1"] < own["client_0"]
    assert report["noise_calibration"] == "shared"
    assert small["noise_multiplier"] == large["noise_multiplier"] == own["client_0"]
    assert 0.95 * target <= small["epsilon"] <= target
    assert large["epsilon"] < 0.9 * target  # more noise than it needed: it spends less


# ----------------------------------------------------------------------------------------
# 5. A plan that would overspend is refused before training
# ----------------------------------------------------------------------------------------
def test_training_past_the_budget_is_refused_and_loses_nothing(tmp_path):
    """A later train() whose plan exceeds dp_target_epsilon raises with the numbers and changes nothing."""
    target, local_steps = 2.0, 2
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_rounds=1, local_steps=local_steps, dp_target_epsilon=target),
        train_dataset=toy_dataset(200),
    )
    trainer.train()
    adapter = copy_state(trainer)
    weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    report = trainer.privacy_report()
    client = trainer.privacy.clients["client_0"]
    projected = epsilon_from_history(
        client.history + [(client.noise_multiplier, client.sample_rate, local_steps)], report["delta"], "rdp"
    )
    assert projected > target

    trainer.args.num_rounds = 2
    budgets = {name: c.step_budget for name, c in trainer.privacy.clients.items()}
    participation = trainer.federation.state_dict()["participation_rng"]
    with pytest.raises(ValueError, match="dp_target_epsilon") as error:
        trainer.train()

    assert f"{projected:.3f}" in str(error.value)
    assert "client_0" in str(error.value)
    assert trainer.privacy_report() == report
    assert all(torch.equal(adapter[name], trainer.global_state()[name]) for name in adapter)
    assert all(torch.equal(weights[name], p) for name, p in trainer.model.named_parameters())
    assert trainer.state.global_step == 1
    assert {name: c.step_budget for name, c in trainer.privacy.clients.items()} == budgets
    assert trainer.federation.state_dict()["participation_rng"] == participation


# ----------------------------------------------------------------------------------------
# 6. Fixed noise and non-private runs say what they are
# ----------------------------------------------------------------------------------------
def test_fixed_noise_run_reports_epsilon_from_its_history_without_a_target(tmp_path, caplog):
    """dp_noise_multiplier: that sigma for everyone, no target, epsilon from the history; the log names the unit."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_rounds=1, dp_noise_multiplier=1.5),
        train_dataset=toy_dataset(200),
    )
    with caplog.at_level(logging.INFO, logger="hf_fedlora.trainer"):
        trainer.train()
    report = trainer.privacy_report()

    assert report["private"] is True and report["target_epsilon"] is None
    assert report["noise_calibration"] == "fixed"
    for client in report["clients"].values():
        assert client["noise_multiplier"] == 1.5
        assert client["steps"] == 2
        assert client["epsilon"] == independent_epsilon(client["history"], report["delta"], "rdp") > 0
    assert "unit: one example" in caplog.text and "accountant=rdp" in caplog.text


def test_non_private_run_says_so(tmp_path, caplog):
    """Without DP settings the report says private False and a warning says the run is non-private."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig), fed_args(tmp_path, num_rounds=1, local_steps=1), train_dataset=toy_dataset(200)
    )
    with caplog.at_level(logging.WARNING, logger="hf_fedlora.trainer"):
        output = trainer.train()

    assert trainer.privacy_report()["private"] is False
    assert trainer.privacy_report()["epsilon"] is None
    assert "epsilon" not in output.metrics
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "non-private" in r.getMessage().lower()]
    assert warnings, caplog.text


# ----------------------------------------------------------------------------------------
# 7. Empty Poisson batches are steps
# ----------------------------------------------------------------------------------------
def test_empty_poisson_batch_still_counts_as_a_step(tmp_path):
    """At a tiny sample rate some batches are empty; each is still a (pure-noise) step the accountant records."""
    steps = 20  # P(no empty batch among 20) ~ 1e-4; the seed makes it deterministic
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_clients=1,
            num_rounds=1,
            local_steps=steps,
            per_device_train_batch_size=1,  # q = 1/200: P(empty batch) ~ 0.37
            dp_noise_multiplier=1.0,
        ),
        train_dataset=toy_dataset(200),
    )
    start = copy_state(trainer)
    batch_sizes = record_batch_sizes(trainer)
    trainer.train()
    client = trainer.privacy_report()["clients"]["client_0"]

    assert len(batch_sizes) == steps and 0 in batch_sizes
    assert client["steps"] == steps
    assert client["history"] == [[1.0, 1 / 200, steps]]
    assert global_update(trainer, start).norm() > 0


# ----------------------------------------------------------------------------------------
# Noise must not be predictable from the sampling
# ----------------------------------------------------------------------------------------
def test_noise_stream_is_independent_of_the_sampling_stream(tmp_path):
    """The Gaussian noise of a client is not derived from the random draws that pick its Poisson batches."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_clients=1, dp_noise_multiplier=1.0),
        train_dataset=toy_dataset(200),
    )
    plan_one_step(trainer)
    sampling = torch.Generator().set_state(trainer.privacy.clients["client_0"].sampling_generator.get_state())
    noise = torch.Generator().set_state(trainer.privacy.clients["client_0"].noise_generator.get_state())
    assert not torch.equal(torch.rand(1000, generator=sampling), torch.rand(1000, generator=noise))
