"""Models whose per-example gradients would not be per-example: refused under DP before training."""

from __future__ import annotations

from torch import nn


def check_no_batch_statistics(model: nn.Module) -> None:
    """BatchNorm in train mode normalises by the batch's statistics, trainable or frozen, so one example's
    gradient depends on the others of its batch and per-example clipping no longer bounds its influence."""
    found = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if found:
        raise ValueError(
            f"Under DP every example's gradient must depend on that example alone, but {', '.join(found[:5])} "
            "normalise by batch statistics in training mode. Replace them (e.g. by GroupNorm or LayerNorm; "
            "opacus.validators.ModuleValidator.fix does this), or train without DP."
        )
