"""LA-LoRA: the per-step B/A schedule through the trainer, its config, and the post-noise low-pass filter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FedLoraConfig, LALoraConfig
from hf_fedlora.federation.adapter_state import HEAD, LORA_A, LORA_B, factor_of
from hf_fedlora.hub import FEDERATED_RECORD_NAME
from hf_fedlora.privacy.postprocessing import NOISY_GRADIENT_FILTERS, binomial_lowpass

NEW_FIELDS = ("alternate_every", "lr_ratio_b", "lowpass_filter")


# --------------------------------------------------------------------------------------
# 1. The schedule, through the trainer (no DP)
# --------------------------------------------------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer, parameter: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    return {key: torch.as_tensor(value).clone() for key, value in optimizer.state.get(parameter, {}).items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def record_steps(trainer: FederatedTrainer) -> list[dict]:
    """Wrap the trainer's local step: per step, which adapter tensors moved and whose optimizer state changed."""
    steps: list[dict] = []
    local_step = trainer._local_step

    def spy(data, indices, optimizer):
        adapter = trainer._adapter
        weights = {name: p.detach().clone() for name, p in adapter.items()}
        states = {name: optimizer_state(optimizer, p) for name, p in adapter.items()}
        loss = local_step(data, indices, optimizer)
        steps.append(
            {
                "moved": {name for name, p in adapter.items() if not torch.equal(p.detach(), weights[name])},
                "state_changed": {
                    name for name, p in adapter.items() if not states_equal(optimizer_state(optimizer, p), states[name])
                },
            }
        )
        return loss

    trainer._local_step = spy
    return steps


@pytest.mark.parametrize(
    ("alternate_every", "expected"),
    [(1, [LORA_B, LORA_A, LORA_B, LORA_A]), (2, [LORA_B, LORA_B, LORA_A, LORA_A])],
    ids=["every_step", "every_2_steps"],
)
def test_schedule_trains_one_factor_per_step_b_first_and_freezes_the_other(tmp_path, alternate_every, expected):
    """Each local step moves only the scheduled factor (all its tensors) and the head; the other factor's weights and
    optimizer state stay exactly as they were. Every client-round starts with B."""
    model = tiny_peft(LALoraConfig, alternate_every=alternate_every)
    args = fed_args(tmp_path, num_rounds=2, num_clients=2, local_steps=4, weight_decay=0.1)
    trainer = FederatedTrainer(model, args, train_dataset=toy_dataset(64))
    steps = record_steps(trainer)
    trainer.train()

    names = {factor: {n for n in trainer._adapter if factor_of(n) == factor} for factor in (LORA_A, LORA_B, HEAD)}
    assert names[LORA_A] and names[LORA_B] and names[HEAD]
    assert len(steps) == 2 * 2 * 4  # rounds x clients x local steps
    for index, step in enumerate(steps):
        active = expected[index % 4]
        inactive = LORA_A if active == LORA_B else LORA_B
        assert step["moved"] == names[active] | names[HEAD], f"step {index % 4} of a client-round"
        assert not step["state_changed"] & names[inactive], f"step {index % 4}: {inactive} optimizer state changed"
        assert step["state_changed"] >= names[active]


@pytest.mark.parametrize("alternate_every", [1, 2, 3])
def test_method_schedule_phases(alternate_every):
    """Step s trains B when (s // alternate_every) is even, else A; the round and sub-round do not shift it."""
    method = LALoraConfig(r=4, target_modules=["query"], alternate_every=alternate_every).build_method()
    for round_index in (0, 3):
        got = [next(iter(method.trained_lora_factors(round_index, 0, step))) for step in range(4 * alternate_every)]
        expected = ([LORA_B] * alternate_every + [LORA_A] * alternate_every) * 2
        assert got == expected
        assert method.trained_factors(round_index, 0, 0) == {LORA_B, HEAD}
    assert method.uploaded_factors(0, 0) == {LORA_A, LORA_B, HEAD}
    assert method.num_sub_rounds(0) == 1


# --------------------------------------------------------------------------------------
# 2. The config: learning-rate ratio, filter switch, validation, round trip
# --------------------------------------------------------------------------------------
def test_learning_rate_scale_gives_b_the_ratio_and_everything_else_one():
    method = LALoraConfig(r=4, target_modules=["query"], lr_ratio_b=2.5).build_method()
    assert method.learning_rate_scale(LORA_B) == 2.5
    assert method.learning_rate_scale(LORA_A) == 1.0
    assert method.learning_rate_scale(HEAD) == 1.0
    assert LALoraConfig(r=4, target_modules=["query"]).build_method().learning_rate_scale(LORA_B) == 1.0


def test_filter_is_named_when_on_and_absent_when_off():
    """The name the method hands the privacy layer resolves to the binomial low-pass filter; off means no filter."""
    on = LALoraConfig(r=4, target_modules=["query"]).build_method()
    assert NOISY_GRADIENT_FILTERS[on.noisy_gradient_filter()] is binomial_lowpass
    assert (
        LALoraConfig(r=4, target_modules=["query"], lowpass_filter=False).build_method().noisy_gradient_filter() is None
    )


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"alternate_every": 0}, "alternate_every"),
        ({"alternate_every": 1.5}, "alternate_every"),
        ({"alternate_every": True}, "alternate_every"),
        ({"lr_ratio_b": 0.0}, "lr_ratio_b"),
        ({"lr_ratio_b": -1.0}, "lr_ratio_b"),
        ({"lr_ratio_b": math.nan}, "lr_ratio_b"),
        ({"lr_ratio_b": math.inf}, "lr_ratio_b"),
        ({"lr_ratio_b": "2"}, "lr_ratio_b"),
        ({"lowpass_filter": "yes"}, "lowpass_filter"),
        ({"lowpass_filter": 1}, "lowpass_filter"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field_name):
    with pytest.raises(ValueError, match=field_name):
        LALoraConfig(r=4, target_modules=["query"], **kwargs)


def test_settings_round_trip_through_the_record_and_stay_out_of_the_plain_peft_config(tmp_path):
    """A saved LA-LoRA adapter: adapter_config.json is plain LoRA; from_pretrained gives back LALoraConfig and its
    settings from federated_training.json."""
    settings = {"alternate_every": 2, "lr_ratio_b": 2.0, "lowpass_filter": False, "init_seed": 3}
    trainer = FederatedTrainer(
        tiny_peft(LALoraConfig, **settings), fed_args(tmp_path / "run", num_rounds=1), train_dataset=toy_dataset(32)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    plain = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not set(settings) & set(plain)
    record = json.loads((tmp_path / "adapter" / FEDERATED_RECORD_NAME).read_text())
    assert record["method"] == {"method": "la_lora", **settings}
    config = FedLoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert type(config) is LALoraConfig
    assert {name: getattr(config, name) for name in settings} == settings
    assert config.federated_fields == ("init_seed", *NEW_FIELDS)


# --------------------------------------------------------------------------------------
# 3. The low-pass filter
# --------------------------------------------------------------------------------------
def reference_lowpass(rows: np.ndarray) -> np.ndarray:
    """numpy: pad each row symmetrically by 2 (edge repeated) and convolve with [1, 4, 6, 4, 1] / 16."""
    kernel = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    return np.stack([np.convolve(np.pad(row, 2, mode="symmetric"), kernel, mode="valid") for row in rows])


@pytest.mark.parametrize("features", [1, 2, 3, 4, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_equals_reference_convolution_along_the_feature_axis(features, dtype):
    """lora_A (r x n) is smoothed along n in each row, lora_B (m x r) along m in each column, as numpy does it."""
    generator = torch.Generator().manual_seed(features)
    grad_a = torch.randn(4, features, generator=generator, dtype=dtype)
    grad_b = torch.randn(features, 4, generator=generator, dtype=dtype)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}

    filtered_a = binomial_lowpass(grad_a, LORA_A)
    filtered_b = binomial_lowpass(grad_b, LORA_B)
    assert filtered_a.dtype == dtype and filtered_b.dtype == dtype
    assert filtered_a.shape == grad_a.shape and filtered_b.shape == grad_b.shape
    np.testing.assert_allclose(filtered_a.numpy(), reference_lowpass(grad_a.double().numpy()), **tolerance)
    np.testing.assert_allclose(filtered_b.numpy(), reference_lowpass(grad_b.double().numpy().T).T, **tolerance)


def test_filter_never_mixes_rank_components():
    """Perturbing one rank component (a row of A's gradient, a column of B's) changes only that component."""
    generator = torch.Generator().manual_seed(0)
    for factor, shape, component in ((LORA_A, (4, 9), lambda t: t[2]), (LORA_B, (9, 4), lambda t: t[:, 2])):
        gradient = torch.randn(*shape, generator=generator)
        perturbed = gradient.clone()
        component(perturbed).add_(torch.randn(9, generator=generator))
        change = binomial_lowpass(perturbed, factor) - binomial_lowpass(gradient, factor)
        assert component(change).abs().max() > 0
        component(change).zero_()
        assert torch.equal(change, torch.zeros_like(change)), f"{factor}: another rank component changed"


def test_filter_passes_the_head_through_and_keeps_constants():
    head_gradient = torch.randn(3, 16)
    assert torch.equal(binomial_lowpass(head_gradient, HEAD), head_gradient)
    constant = torch.full((4, 6), 2.5)
    assert torch.allclose(binomial_lowpass(constant, LORA_A), constant)  # kernel sums to 1, symmetric edges


def test_filter_refuses_a_non_matrix_lora_factor():
    with pytest.raises(ValueError, match="lowpass_filter=False"):
        binomial_lowpass(torch.zeros(4, 3, 1, 1), LORA_A)
