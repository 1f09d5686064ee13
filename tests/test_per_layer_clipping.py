"""Per-layer clipping (`dp_clipping="per_layer"`): each trainable tensor clipped on its own to C / sqrt(P).

What must hold: every example's whole gradient still has norm at most C (so the flat noise sigma * C and the
accounting stay right), and a tensor with a small gradient (a LoRA factor beside a fresh head) keeps its share.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import fed_args

from hf_fedlora import FederatedTrainingArguments
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.client_level import clip_update
from hf_fedlora.privacy.dp_optimizer import ShapedNoiseDPOptimizer


def clipped_sum(clipping: str, clip: float, per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optimizer's clipped sum over a batch whose per-example gradients are given, one entry per tensor."""
    params = {name: torch.nn.Parameter(torch.zeros(g.shape[1:])) for name, g in per_example.items()}
    optimizer = ShapedNoiseDPOptimizer(
        torch.optim.SGD(params.values(), lr=1.0),
        noise_for=lambda parameter, std, generator: torch.zeros_like(parameter),
        after_noise=lambda parameter, noisy: noisy,
        clipping=clipping,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=1,
    )
    for name, parameter in params.items():
        parameter.grad_sample = per_example[name].clone()
    optimizer.clip_and_accumulate()
    return {name: parameter.summed_grad for name, parameter in params.items()}


def test_per_layer_gives_each_tensor_an_equal_share_of_the_clip_norm():
    """A head whose gradient is 20x the factor's takes almost all of a flat clip; per layer, each gets C/sqrt(2)."""
    clip = 1.0
    head = torch.zeros(1, 3, 4)
    head[0, 0, 0] = 10.0  # norm 10
    factor = torch.zeros(1, 8)
    factor[0, 0] = 0.5  # norm 0.5, under C / sqrt(2)
    per_example = {"head": head, "factor": factor}

    flat = clipped_sum("flat", clip, per_example)
    per_layer = clipped_sum("per_layer", clip, per_example)

    joint = clip / math.hypot(10.0, 0.5)
    assert flat["head"].norm().item() == pytest.approx(10.0 * joint, rel=1e-4)
    assert flat["factor"].norm().item() == pytest.approx(0.5 * joint, rel=1e-4)  # ~0.05: mostly lost to noise
    threshold = clip / math.sqrt(2)
    assert per_layer["head"].norm().item() == pytest.approx(threshold, rel=1e-4)
    assert per_layer["factor"].norm().item() == pytest.approx(0.5, rel=1e-4)  # under its threshold: untouched
    total = math.hypot(per_layer["head"].norm().item(), per_layer["factor"].norm().item())
    assert total <= clip * (1 + 1e-5)


def test_per_layer_bounds_every_example_at_the_clip_norm_for_any_gradients():
    """P tensors, random per-example gradients of any scale: each example's clipped whole gradient has norm <= C."""
    generator = torch.Generator().manual_seed(0)
    clip, batch = 0.3, 6
    per_example = {
        f"t{i}": torch.randn(batch, *shape, generator=generator) * scale
        for i, (shape, scale) in enumerate([((4, 4), 100.0), ((7,), 1e-3), ((2, 3), 1.0), ((5,), 0.2)])
    }
    for index in range(batch):  # one example at a time: its own clipped gradient
        one = {name: g[index : index + 1] for name, g in per_example.items()}
        clipped = clipped_sum("per_layer", clip, one)
        norms = [value.norm().item() for value in clipped.values()]
        assert all(norm <= clip / math.sqrt(4) * (1 + 1e-5) for norm in norms)
        assert math.sqrt(sum(norm**2 for norm in norms)) <= clip * (1 + 1e-5)
        for name, value in clipped.items():  # a tensor under its threshold passes unchanged, others are scaled
            raw = one[name][0]
            expected = raw * min(1.0, (clip / 2) / (raw.norm().item() + 1e-6))
            torch.testing.assert_close(value, expected)


def test_client_unit_per_layer_release_clips_each_tensor_to_its_share():
    """DP-FedAvg's clip of a client's round update, per tensor: each of the P tensors to C / sqrt(P)."""
    update = {"x.lora_B.default.weight": torch.full((8, 8), 0.002), "classifier.weight": torch.full((2, 8), 5.0)}
    clipped = clip_update(update, 0.05, "per_layer")
    threshold = 0.05 / math.sqrt(2)  # clip norm 0.05 over two tensors
    assert clipped["classifier.weight"].norm().item() == pytest.approx(threshold, rel=1e-3)
    assert clipped["x.lora_B.default.weight"].norm().item() == pytest.approx(0.016, rel=1e-3)  # under: kept
    flat = clip_update(update, 0.05, "flat")
    assert math.sqrt(sum(float(t.norm()) ** 2 for t in flat.values())) == pytest.approx(0.05, rel=1e-4)


def test_unknown_clipping_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="dp_clipping"):
        fed_args(tmp_path, dp_clipping="per_tensor", dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="dp_clipping"):
        FederatedPrivacy(target_epsilon=None, target_delta=1e-5, noise_multiplier=1.0, clip_norm=1.0, clipping="x")


def test_default_is_flat_and_the_record_names_the_clipping(tmp_path):
    assert FederatedTrainingArguments(output_dir=str(tmp_path)).dp_clipping == "flat"
    args = fed_args(tmp_path, dp_clipping="per_layer", dp_noise_multiplier=1.0)
    assert FederatedPrivacy.from_args(args).report()["clipping"] == "per_layer"
