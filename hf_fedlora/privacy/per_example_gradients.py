"""Per-example gradients with Opacus hooks on the user's own model (no wrapper module).

Opacus records activations only for modules that are trainable when the hooks are
attached, so the hooks are re-attached whenever the trained set changes (methods that
alternate factors); otherwise backward fails with "No activations detected".

Opacus takes the first dimension of a layer's input as the batch. Swin's window attention
reshapes the batch into (batch * windows, tokens, dim), so its LoRA layers get one gradient
row per window. The hooks therefore run with loss_reduction="sum" (the caller backpropagates
the SUM of per-example losses, so no layer is rescaled by a wrong "batch" size), and
`fold_to_batch` sums each example's window rows into that example's gradient after backward.
"""

from __future__ import annotations

import torch
from torch import nn

from .opacus_compat import GradSampleHooks


def check_supported(model: nn.Module, trainable_names: set[str]) -> None:
    """Raise a ValueError naming any module Opacus cannot give per-example gradients for."""
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in trainable_names)
        errors = GradSampleHooks.validate(model, strict=False)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous[name])
    if errors:
        details = "; ".join(str(error) for error in errors)
        raise ValueError(
            "A trainable module cannot be trained with per-example DP-SGD (Opacus): "
            f"{details}. Freeze it, replace it (e.g. BatchNorm by GroupNorm/LayerNorm), or train without DP."
        )


class PerExampleGradients:
    """Keeps Opacus's per-example gradient hooks in step with the set of trainable parameters."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._hooks: GradSampleHooks | None = None
        self._hooked_for: frozenset[str] | None = None

    def attach_for(self, trainable_names: frozenset[str]) -> None:
        """(Re)attach hooks if the trainable set changed since the last attach."""
        if self._hooks is not None and trainable_names == self._hooked_for:
            return
        self.remove()
        # "sum": grad_sample[i] is d(loss)/d(theta) restricted to row i, with no scaling by the row count, which
        # is the window count, not the batch size, inside Swin. The backpropagated loss must be the batch SUM.
        self._hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum", strict=True)
        self._hooked_for = trainable_names

    @torch.no_grad()
    def fold_to_batch(self, batch_size: int) -> None:
        """Make every trainable `grad_sample` one row per example: sum each example's consecutive rows.

        Call after backward, before the DP optimizer's step, with the number of examples in that backward
        pass (under Poisson sampling the realised batch, not the expected batch size). A layer that saw
        the batch reshaped into k * batch_size rows (Swin windows) gets them summed in consecutive groups
        of k. That is exact because a linear layer's gradient is a sum over the rows of its input and, in
        transformers' `window_partition` (models/swin/modeling_swin.py, checked in transformers 5.23), the
        windows are batch-major: input (batch, H, W, C) is viewed as (batch, H/ws, ws, W/ws, ws, C) and
        flattened with batch outermost, so rows [i*k, (i+1)*k) are example i's windows. Layers that already
        have batch_size rows (ViT, BERT, RoBERTa, every head) are left as they are.
        """
        for name, parameter in self.model.named_parameters():
            grad_sample = getattr(parameter, "grad_sample", None) if parameter.requires_grad else None
            if grad_sample is None:
                continue
            if isinstance(grad_sample, list):  # one entry per backward pass since the last step (Opacus)
                parameter.grad_sample = [_fold(name, rows, batch_size) for rows in grad_sample]
            else:
                parameter.grad_sample = _fold(name, grad_sample, batch_size)

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
        self._hooks = None
        self._hooked_for = None


def _fold(name: str, grad_sample: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Sum consecutive groups of k = rows / batch_size rows into one row per example."""
    rows = grad_sample.shape[0]
    if rows == batch_size:
        return grad_sample
    if grad_sample.is_floating_point() and torch.finfo(grad_sample.dtype).bits < 32:
        grad_sample = grad_sample.float()  # fp16: a sum of windows may exceed 65504 where no window does
    if batch_size <= 0 or rows % batch_size != 0:
        raise ValueError(
            f"Per-example gradient of {name!r} has {rows} rows, which is not a multiple of the batch size "
            f"{batch_size}: the layer's input was reshaped in a way that does not keep whole examples together, "
            "so its per-example gradients cannot be recovered. Pass the number of examples in the batch, or "
            "exclude this module from target_modules / modules_to_save for DP training."
        )
    return grad_sample.reshape(batch_size, rows // batch_size, *grad_sample.shape[1:]).sum(dim=1)
