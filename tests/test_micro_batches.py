"""Large DP batches in small memory, and mixed precision under DP.

A logical batch (per_device_train_batch_size x gradient_accumulation_steps) is one Poisson sample, one noise draw,
one optimizer step and one accountant step, however many physical micro-batches it runs in.

Mixed precision: bf16 and fp16 autocast the forward; what decides the guarantee (per-example norms, clipping, noise,
the update) is float32. Under per-example DP, fp16's loss scale is fixed and divided out of each example's gradient,
and an example that overflows contributes zero; without it, each client round has its own GradScaler.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tiny import VOCAB, fed_args, tiny_peft, toy_dataset
from torch import nn

from hf_fedlora import FederatedTrainer, FFALoraConfig, LALoraConfig
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.dp_optimizer import ShapedNoiseDPOptimizer

LOGICAL = 28


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout draws depend on how a batch is split; without it a split cannot change the gradients."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def run_split(tmp_path, config_cls, physical: int, n: int, local_steps: int = 3, dataset=None, data_collator=None):
    """One client, one round, a fixed secret seed: the trained adapter, the micro-batches (their indices) and the
    trainer. `dataset` (default: the toy task of n examples) and `data_collator` are passed to the trainer."""
    trainer = FederatedTrainer(
        no_dropout(tiny_peft(config_cls)),
        fed_args(
            tmp_path / f"p{physical}",
            num_rounds=1,
            num_clients=1,
            local_steps=local_steps,
            per_device_train_batch_size=physical,
            gradient_accumulation_steps=LOGICAL // physical,
            optim="sgd",
            learning_rate=0.5,
            weight_decay=0.0,
            dp_noise_multiplier=0.7,
            dp_clip_norm=0.05,  # small: every example is clipped, so the sum of clipped gradients is what counts
            dp_secret_seed=5,
        ),
        train_dataset=toy_dataset(n) if dataset is None else dataset,
        data_collator=data_collator,
    )
    batches: list[list[int]] = []
    backward = trainer._backward_batch

    def recording(data, indices, loss_scale=1.0):
        batches.append(list(indices))
        return backward(data, indices, loss_scale)

    trainer._backward_batch = recording
    trainer.train()
    return {k: p.detach().clone() for k, p in trainer._adapter.items()}, batches, trainer


@pytest.mark.parametrize("config_cls", [FFALoraConfig, LALoraConfig])
def test_whole_poisson_batch_in_1_2_and_7_micro_batches_gives_the_same_update(tmp_path, config_cls):
    """Sample rate 1 (n = logical = 28): every step's batch is all 28 examples, run in 1, 2 or 7 micro-batches.
    Same secret seed, same update to float tolerance; one accountant step per logical batch."""
    results = {physical: run_split(tmp_path, config_cls, physical, n=LOGICAL) for physical in (28, 14, 4)}
    reference, _, _ = results[28]
    for physical, (adapter, batches, trainer) in results.items():
        assert [len(b) for b in batches] == [physical] * (
            3 * LOGICAL // physical
        )  # 3 steps of 28 // physical micro-batches
        for key in reference:
            torch.testing.assert_close(adapter[key], reference[key], rtol=1e-5, atol=1e-6)
        client = trainer.privacy.clients["client_0"]
        assert client.history == [(0.7, 1.0, 3)]  # q = 28 / 28, 3 logical steps, whatever the split
    trained = results[28][0]
    start = tiny_peft(config_cls)
    assert any(not torch.equal(trained[k], p) for k, p in start.named_parameters() if k in trained)


def test_poisson_sampled_logical_batches_split_the_same_way(tmp_path):
    """q = 28 / 60: the secret sampler draws one batch per logical step (random sizes); split into micro-batches
    of at most 28, 14 or 4 it gives the same update, and the accountant records q = logical / n."""
    results = {physical: run_split(tmp_path, FFALoraConfig, physical, n=60, local_steps=4) for physical in (28, 14, 4)}
    reference, batches_28, _ = results[28]
    for physical, (adapter, batches, trainer) in results.items():
        assert max(len(b) for b in batches) <= physical
        assert sum(len(b) for b in batches) == sum(
            len(b) for b in batches_28
        )  # the same Poisson batches, only split differently
        for key in reference:
            torch.testing.assert_close(adapter[key], reference[key], rtol=1e-5, atol=1e-6)
        assert trainer.privacy.clients["client_0"].history == [(0.7, LOGICAL / 60, 4)]
    assert len(results[4][1]) >= 4 * 6  # every logical batch (~13 examples) took several micro-batches of 4


def varied_length_dataset(n: int, seed: int = 0) -> Dataset:
    """Unpadded token sequences of 1 to 24 tokens (the collator pads each micro-batch to its own longest)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 25, (n,), generator=generator).tolist()
    ids = [torch.randint(1, VOCAB, (length,), generator=generator).tolist() for length in lengths]
    return Dataset.from_dict({"input_ids": ids, "label": [row[0] * 2 // VOCAB for row in ids]})


def pad_to_longest(features: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    return {
        "input_ids": torch.tensor([f["input_ids"] + [0] * (width - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        ),
        "labels": torch.tensor([f["label"] for f in features]),
    }


def test_dp_micro_batches_are_grouped_by_length_without_changing_the_update(tmp_path):
    """Under DP a logical batch of unpadded sequences is sorted by length before it is split, so each micro-batch
    pads to its own longest example; the update equals the one-micro-batch update (each example's gradient is its
    own), and fewer padded tokens are processed."""
    data = varied_length_dataset(LOGICAL)
    runs = {
        physical: run_split(tmp_path, FFALoraConfig, physical, LOGICAL, 2, data, pad_to_longest) for physical in (28, 7)
    }
    adapters = {physical: adapter for physical, (adapter, _, _) in runs.items()}
    widths = {
        physical: [[len(data[i]["input_ids"]) for i in b] for b in batches]
        for physical, (_, batches, _) in runs.items()
    }
    for key in adapters[28]:
        torch.testing.assert_close(adapters[7][key], adapters[28][key], rtol=1e-5, atol=1e-6)
    for step in range(2):  # 4 micro-batches per step, in increasing length
        micro = widths[7][4 * step : 4 * step + 4]
        assert all(max(a) <= min(b) for a, b in zip(micro, micro[1:], strict=False))
    padded_sorted = sum(len(m) * max(m) for m in widths[7])
    padded_whole = sum(len(m) * max(m) for m in widths[28])
    assert padded_sorted < 0.8 * padded_whole


def test_noise_is_added_once_per_logical_batch(tmp_path, monkeypatch):
    """Noise is drawn once per logical step (for each trained tensor), not once per micro-batch."""
    draws = []
    noise = FederatedPrivacy.noise

    def counting(*args, **kwargs):
        draws.append(args[0])
        return noise(*args, **kwargs)

    monkeypatch.setattr(FederatedPrivacy, "noise", staticmethod(counting))
    _, batches, trainer = run_split(tmp_path, FFALoraConfig, 4, n=LOGICAL)
    trained = [k for k, p in trainer._adapter.items() if p.requires_grad]
    assert len(batches) == 3 * 7
    assert len(draws) == 3 * len(trained)


def test_logical_batch_sets_the_planned_steps_and_the_record(tmp_path):
    """local_epochs counts logical batches; the record's batch size is the logical (expected Poisson) batch."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path,
            num_rounds=1,
            num_clients=1,
            local_steps=None,
            local_epochs=1.0,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=5,
            dp_noise_multiplier=1.0,
        ),
        train_dataset=toy_dataset(60),
    )
    trainer.train()
    assert trainer.privacy.clients["client_0"].history == [(1.0, 20 / 60, 3)]  # 60 examples / 20 per step
    record = trainer.federated_record()
    assert (record["batch_size"], record["physical_batch_size"]) == (20, 4)


def test_non_private_accumulation_matches_one_big_batch(tmp_path):
    """Without DP, micro-batches accumulate to the logical batch's mean gradient (Trainer's convention)."""
    adapters = []
    for physical in (12, 3):
        trainer = FederatedTrainer(
            no_dropout(tiny_peft(FFALoraConfig)),
            fed_args(
                tmp_path / str(physical),
                num_rounds=1,
                num_clients=1,
                local_steps=2,
                per_device_train_batch_size=physical,
                gradient_accumulation_steps=12 // physical,
                optim="sgd",
                learning_rate=0.5,
            ),
            train_dataset=toy_dataset(48),
        )
        trainer.train()
        adapters.append({k: p.detach().clone() for k, p in trainer._adapter.items()})
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Mixed precision under DP
# ----------------------------------------------------------------------------------------
def test_bf16_dp_run_autocasts_the_forward_and_clips_and_noises_in_float32(tmp_path, monkeypatch):
    """bf16=True on CPU: the forward runs in bf16 (autocast), and what decides the guarantee, per-example norms,
    clipping, the noise and the update, is float32."""
    seen: dict[str, set] = {"logits": set(), "norms": set(), "summed": set(), "noise": set(), "grad": set()}
    clip = ShapedNoiseDPOptimizer.clip_and_accumulate
    noise = FederatedPrivacy.noise

    def recording_clip(self):
        seen["norms"].update(g.dtype for g in self.grad_samples)  # what the per-example norms are computed from
        clip(self)
        seen["summed"].update(p.summed_grad.dtype for p in self.params)

    def recording_noise(*args, **kwargs):
        drawn = noise(*args, **kwargs)
        seen["noise"].add(drawn.dtype)
        return drawn

    monkeypatch.setattr(ShapedNoiseDPOptimizer, "clip_and_accumulate", recording_clip)
    monkeypatch.setattr(FederatedPrivacy, "noise", staticmethod(recording_noise))
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(
            tmp_path, bf16=True, gradient_accumulation_steps=2, per_device_train_batch_size=4, dp_target_epsilon=8
        ),
        train_dataset=toy_dataset(64),
    )
    head = trainer.model.base_model.model.classifier.modules_to_save["default"]
    head.register_forward_hook(lambda module, inputs, output: seen["logits"].add(output.dtype))
    before = {k: p.detach().clone() for k, p in trainer._adapter.items()}
    output = trainer.train()
    assert seen["logits"] == {torch.bfloat16}
    assert seen["norms"] == seen["summed"] == seen["noise"] == {torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer._adapter.values())
    assert any(not torch.equal(before[k], p) for k, p in trainer._adapter.items())
    assert 0 < output.metrics["epsilon"] <= 8


def cpu_fp16(trainer: FederatedTrainer) -> FederatedTrainer:
    """fp16 autocast on CPU, as a GPU runs it: Accelerate leaves fp16 off on CPU, so its autocast is replaced."""
    trainer.accelerator.autocast = lambda *args, **kwargs: torch.autocast("cpu", dtype=torch.float16)
    return trainer


def fp16_comparison_run(tmp_path, fp16: bool, **overrides) -> tuple[FederatedTrainer, dict[str, torch.Tensor]]:
    """One client, one round, a fixed secret seed, no dropout: the trainer and how far its adapter moved."""
    kwargs = dict(num_rounds=1, num_clients=1, local_steps=3, optim="sgd", learning_rate=0.5, weight_decay=0.0)
    trainer = FederatedTrainer(
        no_dropout(tiny_peft(FFALoraConfig)),
        fed_args(tmp_path / f"fp16-{fp16}", fp16=fp16, **{**kwargs, **overrides}),
        train_dataset=toy_dataset(48),
    )
    if fp16:
        cpu_fp16(trainer)
    before = {k: p.detach().clone() for k, p in trainer._adapter.items()}
    trainer.train()
    return trainer, {k: p.detach() - before[k] for k, p in trainer._adapter.items()}


# Noise this small leaves the clipped gradients visible in the update; a clip norm this large clips none of them,
# so a loss scale left in the per-example gradients (x256) would show in full.
NEARLY_NOISELESS = dict(dp_noise_multiplier=1e-6, dp_clip_norm=1e3, dp_secret_seed=3)


def test_fp16_dp_run_divides_the_fixed_loss_scale_out_and_matches_float32(tmp_path, monkeypatch):
    """fp16=True under DP: the forward runs in fp16, the per-example gradients are recorded in fp16 from the loss
    times dp_fp16_loss_scale, and the update (noise, sampling and seed equal) is the float32 run's to fp16 precision."""
    seen: dict[str, set] = {"recorded": set(), "norms": set(), "scale": set()}
    unscale = ShapedNoiseDPOptimizer._unscale_and_zero_non_finite

    def recording(self):
        seen["recorded"].update(p.grad_sample.dtype for p in self.params)
        seen["scale"].add(self.loss_scale)
        unscale(self)
        seen["norms"].update(p.grad_sample.dtype for p in self.params)

    monkeypatch.setattr(ShapedNoiseDPOptimizer, "_unscale_and_zero_non_finite", recording)
    trainer, update16 = fp16_comparison_run(tmp_path, True, **NEARLY_NOISELESS)
    assert seen == {"recorded": {torch.float16}, "norms": {torch.float32}, "scale": {256.0}}
    assert all(p.dtype == torch.float32 for p in trainer._adapter.values())
    _, update32 = fp16_comparison_run(tmp_path, False, **NEARLY_NOISELESS)
    for key, expected in update32.items():
        assert expected.norm() > 0 or key.endswith("lora_A.default.weight")
        torch.testing.assert_close(update16[key], expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_fp16_overflow_drops_the_example_silently_and_the_step_is_still_spent(tmp_path):
    """A loss scale so large that every example's fp16 gradient overflows: each contributes zero (not NaN), the
    steps still run with their noise and are accounted, so the epsilon equals a normal run's."""
    overflowing, update = fp16_comparison_run(tmp_path, True, **{**NEARLY_NOISELESS, "dp_fp16_loss_scale": 1e30})
    normal, normal_update = fp16_comparison_run(tmp_path / "normal", True, **NEARLY_NOISELESS)
    assert all(torch.isfinite(u).all() for u in update.values())
    # noise only: per entry std sqrt(3 steps) x lr 0.5 x sigma C 1e-3 / batch 8 = 1.1e-4
    assert max(float(u.abs().max()) for u in update.values()) < 1e-3
    assert max(float(u.abs().max()) for u in normal_update.values()) > 1e-2
    steps = [{name: c.steps_taken for name, c in t.privacy.clients.items()} for t in (overflowing, normal)]
    assert steps[0] == steps[1] and list(steps[0].values()) == [3]
    assert overflowing.privacy_report() == normal.privacy_report()


def test_loss_scale_is_divided_out_and_a_non_finite_example_contributes_zero_in_every_tensor():
    scale = 256.0
    gradients = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.0, 1.0]]), "b": torch.tensor([[0.0], [0.0], [1.0]])}
    params = {name: torch.nn.Parameter(torch.zeros(g.shape[1:])) for name, g in gradients.items()}
    optimizer = ShapedNoiseDPOptimizer(
        torch.optim.SGD(params.values(), lr=1.0),
        noise_for=lambda parameter, std, generator: torch.zeros_like(parameter),
        after_noise=lambda parameter, noisy: noisy,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
        loss_scale=scale,
    )
    for name, parameter in params.items():
        parameter.grad_sample = (gradients[name] * scale).half()
    params["b"].grad_sample[2] = float("inf")  # example 2 overflowed in one tensor only
    optimizer.clip_and_accumulate()
    # example 0 (norm 5) is clipped to norm 1, example 1 (norm 0.5) kept as is, example 2 dropped from both tensors
    torch.testing.assert_close(params["a"].summed_grad, torch.tensor([0.6 + 0.3, 0.8 + 0.4]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(params["b"].summed_grad, torch.tensor([0.0]))


def test_fp16_without_dp_unscales_with_a_fresh_grad_scaler_per_client_round(tmp_path, monkeypatch):
    """Non-private fp16: the client round's own GradScaler, unscaled before the (binding) clip, so the update is
    the float32 run's to fp16 precision."""
    scalers = []
    local_step = FederatedTrainer._local_step

    def recording(self, data, indices, optimizer):
        scalers.append(self._round.scaler)  # the client round's privacy object (here: non-private) holds it
        return local_step(self, data, indices, optimizer)

    monkeypatch.setattr(FederatedTrainer, "_local_step", recording)
    _, update16 = fp16_comparison_run(tmp_path, True, num_rounds=2, max_grad_norm=0.05)
    assert len(scalers) == 6 and len({id(s) for s in scalers}) == 2  # one per client round, all its steps
    assert all(isinstance(s, torch.amp.GradScaler) and s.get_scale() == 65536.0 for s in scalers)
    _, update32 = fp16_comparison_run(tmp_path, False, num_rounds=2, max_grad_norm=0.05)
    assert max(float(u.abs().max()) for u in update32.values()) > 1e-3
    for key, expected in update32.items():
        torch.testing.assert_close(update16[key], expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_fp16_loss_scale_must_be_positive(tmp_path):
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="dp_fp16_loss_scale"):
            fed_args(tmp_path, fp16=True, dp_fp16_loss_scale=bad, dp_target_epsilon=8)


def test_fp16_under_the_client_unit_matches_float32(tmp_path):
    """Client unit: local steps are non-private (a GradScaler per client round); the round update is clipped and
    noised in float32 at release, as without fp16."""
    client_unit = dict(dp_unit="client", num_clients=2, **NEARLY_NOISELESS)
    trainer, update16 = fp16_comparison_run(tmp_path, True, **client_unit)
    _, update32 = fp16_comparison_run(tmp_path, False, **client_unit)
    assert trainer.privacy_report()["epsilon"] > 0
    assert max(float(u.abs().max()) for u in update32.values()) > 1e-3
    for key, expected in update32.items():
        torch.testing.assert_close(update16[key], expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_window_rows_are_summed_in_float32_under_fp16():
    """Swin-style rows folded into examples: under fp16 their sum may exceed fp16's largest number (65504)."""
    from hf_fedlora.privacy.per_example_gradients import _fold

    rows = torch.full((4, 3), 40000.0, dtype=torch.float16)  # 2 examples x 2 windows
    folded = _fold("layer", rows, batch_size=2)
    assert folded.dtype == torch.float32
    torch.testing.assert_close(folded, torch.full((2, 3), 80000.0))
