"""Opacus's DP optimizer with the two places the methods differ: how the noise is drawn, and what is done
to the gradient after the noise.

Clipping, summing and dividing by the expected batch size stay Opacus's. A noise function may only
return noise whose covariance is at least the nominal (sigma * C)^2 I (DEeR's regulator keeps that);
anything after the noise is post-processing and costs no privacy (LA-LoRA's low-pass filter).

Clipping is Opacus's "flat" (each example's gradient over all tensors together clipped to C) or "per_layer":
each of the P trainable tensors clipped on its own to C / sqrt(P), so the example's whole gradient still has
norm at most C and the noise, accounting and guarantee are the flat ones. Why per layer: a fresh classifier
head's gradient is ~25x a LoRA factor's, so under flat clipping the factor gets ~4% of the clipped norm and
its share of the released sum is mostly noise; per tensor, each gets an equal share (He et al., 2022). Not the
default: on the tweets it cost FFA-LoRA 5-14 points, as the head that carries the accuracy then gets C/2, not ~C
(benchmarks/RESULTS.md#per-layer-clipping).

Before clipping, each example's gradient is brought to float32 with the fp16 loss scale divided out, and an
example whose gradient is not finite (an fp16 overflow) contributes zero instead of NaN; the step is taken and
accounted as always.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .opacus_compat import DPOptimizer, _check_processed_flag, _mark_as_processed

CLIPPINGS = ("flat", "per_layer")

NoiseFunction = Callable[[torch.nn.Parameter, float, torch.Generator | None], torch.Tensor]
AfterNoise = Callable[[torch.nn.Parameter, torch.Tensor], torch.Tensor]


class ShapedNoiseDPOptimizer(DPOptimizer):
    """`DPOptimizer` whose noise per parameter comes from `noise_for` and whose noisy gradient goes through
    `after_noise`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_for: NoiseFunction,
        after_noise: AfterNoise,
        clipping: str = "flat",
        loss_scale: float = 1.0,
        **kw,
    ):
        if clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {list(CLIPPINGS)}, got {clipping!r}")
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"loss_scale must be a finite number > 0, got {loss_scale!r}")
        super().__init__(optimizer, **kw)
        self.noise_for = noise_for
        self.after_noise = after_noise
        self.clipping = clipping
        self.loss_scale = loss_scale
        # Opacus prepares only the parameters trainable when it is built; methods that alternate factors
        # within a client's round make others trainable later.
        for group in self.original_optimizer.param_groups:
            for parameter in group["params"]:
                if not hasattr(parameter, "summed_grad"):
                    parameter.summed_grad = None

    def _get_flat_grad_sample(self, p: torch.Tensor) -> torch.Tensor:
        """Per-example gradients in at least float32: under bf16 autocast the hooks may record them in bf16, and
        a norm computed in bf16 (8 bits of mantissa) could let a clipped gradient exceed the clip norm."""
        grad_sample = super()._get_flat_grad_sample(p)
        if grad_sample.is_floating_point() and torch.finfo(grad_sample.dtype).bits < 32:
            return grad_sample.float()
        return grad_sample

    @torch.no_grad()
    def _unscale_and_zero_non_finite(self) -> None:
        """Each example's gradient with the (fp16) loss scale divided out, in float32; an example whose gradient is
        not finite in any tensor (an fp16 overflow) becomes all zeros, a contribution within the clip norm.

        Nothing else changes with it: the step, its noise and its accounting happen as always. GradScaler instead
        skips the step and shrinks the scale, which an observer of the updates would see, and which would depend
        on a secret example; a NaN left in would turn the released sum into NaN whatever the noise."""
        samples = [self._get_flat_grad_sample(parameter) for parameter in self.params]
        if not samples or len(samples[0]) == 0:
            return
        finite = torch.stack([torch.isfinite(s.reshape(len(s), -1)).all(dim=1) for s in samples]).all(dim=0)
        for parameter, sample in zip(self.params, samples, strict=True):
            keep = finite.to(sample.device).view(-1, *([1] * (sample.dim() - 1)))
            parameter.grad_sample = torch.where(keep, sample / self.loss_scale, torch.zeros_like(sample))

    def clip_and_accumulate(self) -> None:
        self._unscale_and_zero_non_finite()
        if self.clipping == "flat":
            return super().clip_and_accumulate()
        # Per layer: the tensors trainable at this step share the sensitivity C equally (sqrt(P) * C / sqrt(P)).
        threshold = self.max_grad_norm / math.sqrt(len(self.params))
        for parameter in self.params:
            _check_processed_flag(parameter.grad_sample)
            grad_sample = self._get_flat_grad_sample(parameter).to(parameter.dtype)
            norms = grad_sample.reshape(len(grad_sample), -1).norm(2, dim=-1)
            clip_factor = (threshold / (norms + 1e-6)).clamp(max=1.0)
            grad = torch.einsum("i,i...", clip_factor, grad_sample)
            if parameter.summed_grad is not None:
                parameter.summed_grad += grad
            else:
                parameter.summed_grad = grad
            _mark_as_processed(parameter.grad_sample)

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for parameter in self.params:
            _check_processed_flag(parameter.summed_grad)
            noise = self.noise_for(parameter, std, self.generator)
            noisy = (parameter.summed_grad + noise).view_as(parameter)
            parameter.grad = self.after_noise(parameter, noisy)
            _mark_as_processed(parameter.summed_grad)
