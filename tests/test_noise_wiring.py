"""The privacy layer's noise as the methods ask for it: DEeR's regulator on the DP-SGD noise, LA-LoRA's filter
after the noise, Swin under DP. Client-level DP (DP-FedAvg) has its own tests: tests/test_client_level.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant
from tiny import fed_args, tiny_peft, toy_dataset
from transformers import SwinConfig, SwinForImageClassification

from hf_fedlora import DeerConfig, FederatedTrainer, LALoraConfig
from hf_fedlora.federation.adapter_state import LORA_A, LORA_B, factor_of
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.noise_regulator import regulated_noise


def pure_noise_step(trainer: FederatedTrainer, name: str = "client_0") -> dict[str, torch.Tensor]:
    """One DP-SGD step on an empty Poisson batch with SGD at lr 1: the update is minus the noise (filtered, if the
    method filters) over the expected batch size."""
    clients = trainer._clients_ready_for_training()
    trainer.privacy.plan(
        {n: len(d) for n, d in clients.items()},
        trainer.args.per_device_train_batch_size,
        dict.fromkeys(clients, 1),
        trainer.args.device,
    )
    trainer.model.train()
    optimizer = trainer.privacy.private_optimizer(
        trainer._fresh_optimizer(),
        name,
        trainer.args.per_device_train_batch_size,
        trainer._adapter,
        regulate=trainer.method.regulates_noise(),
        noisy_gradient_filter=trainer.method.noisy_gradient_filter(),
    )
    before = {k: p.detach().clone() for k, p in trainer._adapter.items()}
    trainer._local_step(clients[name], [], optimizer)
    batch = trainer.args.per_device_train_batch_size
    return {k: (before[k] - p.detach()) * batch for k, p in trainer._adapter.items() if not torch.equal(before[k], p)}


def noise_args(tmp_path, **overrides):
    return fed_args(
        tmp_path,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        dp_noise_multiplier=2.0,
        dp_clip_norm=0.5,
        dp_secret_seed=11,
        **overrides,
    )


# ----------------------------------------------------------------------------------------
# DEeR's regulator reaches the DP-SGD noise
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("regulator", [True, False])
def test_deer_step_noise_is_regulated_by_the_frozen_A(tmp_path, regulator):
    trainer = FederatedTrainer(
        tiny_peft(DeerConfig, noise_regulator=regulator), noise_args(tmp_path), train_dataset=toy_dataset(64)
    )
    with torch.no_grad():  # a frozen A with sigma_max far above 1
        for key, parameter in trainer._adapter.items():
            if factor_of(key) == LORA_A:
                parameter.mul_(25.0)
    peers = {k: p.detach().clone() for k, p in trainer._adapter.items()}
    generator_state = trainer.privacy._secret_root
    noise = pure_noise_step(trainer)
    assert generator_state == trainer.privacy._secret_root
    std = 2.0 * 0.5
    b_keys = [k for k in noise if factor_of(k) == LORA_B]
    assert b_keys and all(factor_of(k) != LORA_A for k in noise)  # sub-round 0 trains B (and the head)

    # Replay the noise generator: the same draws, shaped (or not) by each layer's frozen A.
    replay = FederatedPrivacy(
        target_epsilon=None, target_delta=1e-5, noise_multiplier=2.0, clip_norm=0.5, secret_seed=11
    )
    replay.plan(
        {n: len(d) for n, d in trainer._clients_ready_for_training().items()},
        8,
        {"client_0": 1, "client_1": 1},
        torch.device("cpu"),
    )
    generator = replay.clients["client_0"].noise_generator
    for key in [k for k in trainer._adapter if trainer._adapter[k].requires_grad]:
        expected = FederatedPrivacy.noise(key, trainer._adapter[key].shape, peers, std, generator, regulator)
        torch.testing.assert_close(noise[key], expected, rtol=1e-4, atol=1e-5)
    if regulator:  # the regulated noise is never below nominal, and above it along A's weak directions
        assert all(noise[k].std() > 1.1 * std for k in b_keys)


def test_regulator_noise_through_the_engine_uses_the_peer():
    generator = torch.Generator().manual_seed(0)
    peer = torch.randn(4, 16) * 3
    peers = {"layer.lora_A.default.weight": peer}
    noise = FederatedPrivacy.noise("layer.lora_B.default.weight", (16, 4), peers, 1.0, generator, True)
    expected = regulated_noise(LORA_B, peer, (16, 4), 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noise, expected)


# ----------------------------------------------------------------------------------------
# LA-LoRA's filter runs on the noisy gradient
# ----------------------------------------------------------------------------------------
def lag_one_correlation(values: torch.Tensor) -> float:
    a, b = values[..., :-1].flatten().numpy(), values[..., 1:].flatten().numpy()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("lowpass", [True, False])
def test_la_lora_filter_smooths_the_noise_along_the_feature_axis(tmp_path, lowpass):
    trainer = FederatedTrainer(
        tiny_peft(LALoraConfig, r=16, lowpass_filter=lowpass), noise_args(tmp_path), train_dataset=toy_dataset(64)
    )
    noise = pure_noise_step(trainer)  # step 0 trains B: its feature axis is the output axis (columns of B^T)
    b_noise = torch.cat([noise[k].T for k in noise if factor_of(k) == LORA_B])
    correlation = lag_one_correlation(b_noise)
    if lowpass:  # [1,4,6,4,1]/16 makes neighbours correlate at 56/70 = 0.8
        assert correlation == pytest.approx(0.8, abs=0.08)
    else:
        assert abs(correlation) < 0.1


# ----------------------------------------------------------------------------------------
# LA-LoRA on Swin under DP
# ----------------------------------------------------------------------------------------
def tiny_swin():
    torch.manual_seed(0)
    config = SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=2,
        num_labels=3,
    )
    from peft import get_peft_model

    return get_peft_model(
        SwinForImageClassification(config),
        LALoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
    )


def image_dataset(n: int = 48):
    generator = torch.Generator().manual_seed(0)
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "pixel_values": torch.randn(n, 3, 16, 16, generator=generator).tolist(),
            "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
        }
    ).with_format("torch")


def independent_rdp_epsilon(history, delta: float) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant()
    for sigma, rate, steps in history:
        event = (
            dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma))
            if rate < 1
            else dp_event.GaussianDpEvent(sigma)
        )
        accountant.compose(event, int(steps))
    return accountant.get_epsilon(delta)


def test_la_lora_dp_run_on_tiny_swin_reports_an_independently_checked_epsilon(tmp_path):
    trainer = FederatedTrainer(
        tiny_swin(),
        fed_args(
            tmp_path,
            num_rounds=2,
            local_steps=3,
            per_device_train_batch_size=6,
            dp_target_epsilon=4.0,
            dp_target_delta=1e-3,
        ),
        train_dataset=image_dataset(),
    )
    start = {k: v.clone() for k, v in trainer.global_state().items()}
    trainer.train()
    report = trainer.privacy_report()
    assert 0 < report["epsilon"] <= 4.0
    for client in report["clients"].values():
        assert client["steps"] == 6
        assert client["epsilon"] == pytest.approx(independent_rdp_epsilon(client["history"], 1e-3), rel=0.02)
    moved = {factor_of(k) for k in start if not torch.equal(start[k], trainer.global_state()[k])}
    assert {LORA_A, LORA_B} <= moved
