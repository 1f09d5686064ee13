"""Trainer's `lr_scheduler_type` runs over the whole federation, not per client-round.

Every client-round builds a fresh optimizer, so the rate of each local step is set from the schedule at that
step's place in the run: step (r x J + j) x S + s of num_rounds x J x S (J sub-rounds of S local steps).
"""

from __future__ import annotations

import pytest
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import DeerConfig, FederatedTrainer, FederatedTrainingArguments, FFALoraConfig, LALoraConfig

LR = 0.1


def rates_per_step(tmp_path, config_cls=FFALoraConfig, **overrides) -> list[list[float]]:
    """Every local step's learning rates (one per parameter group), in the order the steps ran."""
    trainer = FederatedTrainer(
        tiny_peft(config_cls),
        fed_args(tmp_path, learning_rate=LR, **overrides),
        train_dataset=toy_dataset(64),
    )
    seen: list[list[float]] = []
    step = trainer._local_step

    def recording(data, indices, optimizer):
        inner = getattr(optimizer, "original_optimizer", optimizer)  # the optimizer whose step reads the rate
        seen.append(sorted({round(group["lr"], 12) for group in inner.param_groups}))
        return step(data, indices, optimizer)

    trainer._local_step = recording
    trainer.train()
    return seen


def test_the_default_is_constant_as_the_papers_train(tmp_path):
    assert FederatedTrainingArguments(output_dir=str(tmp_path)).lr_scheduler_type == "constant"
    rates = rates_per_step(tmp_path, num_rounds=3, num_clients=2, local_steps=2)
    assert rates == [[LR]] * 12


@pytest.mark.parametrize("private", [False, True])
def test_linear_decays_over_rounds_and_local_steps_alike_for_every_client(tmp_path, private):
    """3 rounds x 2 clients x 2 local steps: each client's k-th step of the run (k = 2r + s) runs at
    LR x (1 - k / 6), under DP (Opacus's optimizer wraps ours) as without."""
    privacy = {"dp_noise_multiplier": 1.0, "dp_secret_seed": 3} if private else {}
    rates = rates_per_step(tmp_path, num_rounds=3, num_clients=2, local_steps=2, lr_scheduler_type="linear", **privacy)
    expected = []
    for round_index in range(3):
        for _client in range(2):
            expected += [[pytest.approx(LR * (1 - (2 * round_index + s) / 6))] for s in range(2)]
    assert rates == expected


def test_warmup_and_sub_rounds_count_every_step_of_the_run(tmp_path):
    """DEeR's two sub-rounds of 2 steps, 2 rounds, one client: the run has 8 steps, 2 of them warmup."""
    rates = rates_per_step(
        tmp_path,
        config_cls=DeerConfig,
        num_rounds=2,
        num_clients=1,
        local_steps=2,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )
    warm = [LR * k / 2 for k in range(2)]
    decay = [LR * (8 - k) / 6 for k in range(2, 8)]
    assert rates == [[pytest.approx(rate)] for rate in warm + decay]


def test_a_method_scaled_rate_is_scheduled_too(tmp_path):
    """LA-LoRA trains B at lr_ratio_b x the rate; the schedule scales both groups alike."""
    trainer_rates = rates_per_step(
        tmp_path,
        config_cls=lambda **kw: LALoraConfig(lr_ratio_b=2.0, **kw),
        num_rounds=2,
        num_clients=1,
        local_steps=1,
        lr_scheduler_type="linear",
    )
    assert trainer_rates == [[pytest.approx(LR), pytest.approx(2 * LR)], [pytest.approx(LR / 2), pytest.approx(LR)]]


def test_a_schedule_on_a_validation_metric_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not supported by federated training"):
        FederatedTrainingArguments(
            output_dir=str(tmp_path), lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps"
        )
