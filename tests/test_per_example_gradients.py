"""Exact per-example gradients under Opacus's hooks for Swin, ViT and RoBERTa (the models DP-SGD runs on).

Each check compares the hooks' per-example gradients (after `fold_to_batch`) with a loop of
one-example backward passes, for the head and the active LoRA factor: B only, then A only,
re-attaching the hooks when the trained set changes, as the trainer does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from peft import get_peft_model
from tiny import tiny_swin, tiny_vit
from transformers import (
    RobertaConfig,
    RobertaForSequenceClassification,
)

from hf_fedlora import LALoraConfig
from hf_fedlora.federation.adapter_state import HEAD, LORA_A, LORA_B, adapter_parameters, parameters_of
from hf_fedlora.privacy import PerExampleGradients

BATCH = 3
NUM_LABELS = 3
IMAGE_SIZE = 16
TOLERANCE = 1e-5  # relative, per example and per parameter, in norm


def tiny_roberta() -> RobertaForSequenceClassification:
    config = RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
    )
    return RobertaForSequenceClassification(config)


def peft_model(name: str):
    """A tiny model with LoRA on its attention's query and value and a trainable classifier, all factors random.

    B is drawn at random (PEFT starts it at zero) so that A's gradients are not trivially zero.
    """
    torch.manual_seed(0)
    base, targets = {
        "swin": (tiny_swin, ["q_proj", "v_proj"]),
        "vit": (tiny_vit, ["q_proj", "v_proj"]),
        "roberta": (tiny_roberta, ["query", "value"]),
    }[name]
    config = LALoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    model = get_peft_model(base(), config)
    with torch.no_grad():
        for parameter in adapter_parameters(model).values():
            parameter.normal_(0.0, 0.3)
    return model


def examples(name: str) -> list[dict[str, torch.Tensor]]:
    """BATCH single examples (each with a leading batch dimension of 1); RoBERTa's have different lengths."""
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, NUM_LABELS, (BATCH,), generator=generator)
    if name in ("swin", "vit"):
        size = IMAGE_SIZE if name == "swin" else 8
        pixels = torch.randn(BATCH, 3, size, size, generator=generator)
        return [{"pixel_values": pixels[i : i + 1], "labels": labels[i : i + 1]} for i in range(BATCH)]
    out = []
    for i, length in enumerate([5, 9, 3]):
        ids = torch.randint(3, 64, (1, length), generator=generator)
        ids[0, 0] = 0  # <s>
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels[i : i + 1]})
    return out


def collate(batch: list[dict[str, torch.Tensor]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Stack images; right-pad text to the longest example, masking the padding."""
    if "pixel_values" in batch[0]:
        return {key: torch.cat([example[key] for example in batch]) for key in batch[0]}
    longest = max(example["input_ids"].shape[1] for example in batch)

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, longest - tensor.shape[1]), value=value)

    return {
        "input_ids": torch.cat([pad(example["input_ids"], pad_token_id) for example in batch]),
        "attention_mask": torch.cat([pad(example["attention_mask"], 0) for example in batch]),
        "labels": torch.cat([example["labels"] for example in batch]),
    }


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch of each example's own cross-entropy (what the DP trainer backpropagates)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return F.cross_entropy(model(**inputs).logits, batch["labels"], reduction="sum")


def set_trainable(model, factors: set[str]) -> dict[str, torch.nn.Parameter]:
    adapter = adapter_parameters(model)
    trainable = parameters_of(adapter, factors)
    for name, parameter in adapter.items():
        parameter.requires_grad_(name in trainable)
    return trainable


def one_example_gradients(model, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Reference: each example alone (unpadded), its own backward pass; (BATCH, *shape) per adapter tensor."""
    adapter = set_trainable(model, {LORA_A, LORA_B, HEAD})
    names = list(adapter)
    rows = {name: [] for name in names}
    for example in batch:
        grads = torch.autograd.grad(summed_loss(model, example), [adapter[n] for n in names])
        for name, grad in zip(names, grads, strict=True):
            rows[name].append(grad)
    return {name: torch.stack(values) for name, values in rows.items()}


def hook_gradients(model, hooks, batch, factors: set[str], fold: bool = True) -> dict[str, torch.Tensor]:
    """Per-example gradients from Opacus's hooks for one batched backward with only `factors` trainable."""
    trainable = set_trainable(model, factors)
    hooks.attach_for(frozenset(trainable))
    summed_loss(model, collate(batch, getattr(model.config, "pad_token_id", None))).backward()
    if fold:
        hooks.fold_to_batch(len(batch))
    result = {name: p.grad_sample for name, p in trainable.items()}
    for parameter in trainable.values():
        parameter.grad, parameter.grad_sample = None, None
    return result


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest ||got_i - want_i|| / ||want_i|| over parameters and examples."""
    worst = 0.0
    for name, rows in got.items():
        assert rows.shape == want[name].shape, f"{name}: {tuple(rows.shape)} vs {tuple(want[name].shape)}"
        for got_row, want_row in zip(rows, want[name], strict=True):
            assert want_row.norm() > 0, f"{name}: zero reference gradient, the check would be vacuous"
            worst = max(worst, float((got_row - want_row).norm() / want_row.norm()))
    return worst


@pytest.mark.parametrize("name", ["swin", "vit", "roberta"])
def test_per_example_gradients_of_active_factor_and_head_match_one_example_passes(name):
    """B-only then A-only (with the head): the hooks' folded per-example gradients equal one-example backward passes."""
    model = peft_model(name)
    model.train()  # Opacus captures activations only in train mode; every dropout probability is 0
    batch = examples(name)
    reference = one_example_gradients(model, batch)
    hooks = PerExampleGradients(model)
    try:
        for active in (LORA_B, LORA_A):
            got = hook_gradients(model, hooks, batch, {active, HEAD})
            assert {f for n in got for f in (LORA_A, LORA_B) if f".{f}." in n} == {active}
            assert any(".modules_to_save." in n for n in got)
            error = max_relative_error(got, reference)
            print(f"{name} {active}+head: max relative error {error:.2e}")
            assert error < TOLERANCE
    finally:
        hooks.remove()


def test_swin_window_layers_really_have_one_row_per_window_without_folding():
    """Control: without folding, Swin's LoRA layers give one row per window, not per example, so the check fails."""
    model = peft_model("swin")
    model.train()
    batch = examples("swin")
    reference = one_example_gradients(model, batch)
    hooks = PerExampleGradients(model)
    try:
        got = hook_gradients(model, hooks, batch, {LORA_B, HEAD}, fold=False)
    finally:
        hooks.remove()
    rows = {n: g.shape[0] for n, g in got.items() if ".lora_B." in n}
    assert BATCH * 4 in rows.values()  # stage 1: 8x8 tokens in 4x4 windows, 4 windows per image
    with pytest.raises(AssertionError, match="lora_B"):
        max_relative_error(got, reference)


def test_dp_optimizer_steps_on_swin_only_after_folding():
    """Opacus's DPOptimizer fails on Swin's raw per-window rows; after folding its sum equals the exact one."""
    model = peft_model("swin")
    model.train()
    batch = examples("swin")
    reference = one_example_gradients(model, batch)
    hooks = PerExampleGradients(model)
    try:
        for fold in (False, True):
            trainable = set_trainable(model, {LORA_B, HEAD})
            hooks.attach_for(frozenset(trainable))
            optimizer = DPOptimizer(
                torch.optim.SGD(trainable.values(), lr=0.0),
                noise_multiplier=0.0,
                max_grad_norm=1e6,  # no clipping: the step's gradient must be the plain mean of the examples'
                expected_batch_size=BATCH,
                loss_reduction="mean",
            )
            summed_loss(model, collate(batch, getattr(model.config, "pad_token_id", None))).backward()
            if not fold:
                with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                continue
            hooks.fold_to_batch(BATCH)
            optimizer.step()
            for name, parameter in trainable.items():
                torch.testing.assert_close(parameter.grad, reference[name].sum(0) / BATCH, rtol=1e-5, atol=1e-7)
    finally:
        hooks.remove()


@pytest.mark.parametrize("name", ["vit", "roberta"])
def test_folding_is_a_no_op_where_the_batch_is_not_reshaped(name):
    """ViT and RoBERTa already give one row per example: folding returns the very same tensors."""
    model = peft_model(name)
    model.train()
    batch = examples(name)
    hooks = PerExampleGradients(model)
    try:
        trainable = set_trainable(model, {LORA_B, HEAD})
        hooks.attach_for(frozenset(trainable))
        summed_loss(model, collate(batch, getattr(model.config, "pad_token_id", None))).backward()
        before = {n: p.grad_sample for n, p in trainable.items()}
        assert all(g.shape[0] == BATCH for g in before.values())
        hooks.fold_to_batch(BATCH)
        assert all(trainable[n].grad_sample is g for n, g in before.items())
    finally:
        hooks.remove()


def test_fold_sums_consecutive_rows_per_example_also_for_lists_and_names_a_bad_shape():
    """Rows are summed in consecutive groups (batch-major windows); list entries fold alike; odd rows fail by name."""
    layer = torch.nn.Linear(2, 1)
    hooks = PerExampleGradients(layer)
    rows = torch.arange(12.0).reshape(6, 1, 2)  # 2 examples x 3 windows
    expected = torch.stack([rows[0:3].sum(0), rows[3:6].sum(0)])
    layer.weight.grad_sample = rows.clone()
    layer.bias.grad_sample = [torch.ones(6, 1), torch.ones(2, 1)]
    hooks.fold_to_batch(2)
    assert torch.equal(layer.weight.grad_sample, expected)
    assert [g.tolist() for g in layer.bias.grad_sample] == [[[3.0], [3.0]], [[1.0], [1.0]]]
    layer.weight.grad_sample = torch.zeros(7, 1, 2)
    with pytest.raises(ValueError, match=r"'weight' has 7 rows, which is not a multiple of the batch size 2"):
        hooks.fold_to_batch(2)
