"""Per-example gradients with Opacus hooks on the user's own model (no wrapper module).

Opacus records activations only for modules that are trainable when the hooks are
attached, so the hooks are re-attached whenever the trained set changes (methods that
alternate factors); otherwise backward fails with "No activations detected".
"""

from __future__ import annotations

from opacus.grad_sample import GradSampleHooks
from torch import nn


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
        self._hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum", strict=True)
        self._hooked_for = trainable_names

    def remove(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
        self._hooks = None
        self._hooked_for = None
