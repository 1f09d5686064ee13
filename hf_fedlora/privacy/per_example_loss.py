"""The loss DP-SGD backpropagates: the sum over the batch of each example's own loss.

DP-SGD clips each example's gradient, so an example's gradient must not depend on the other
examples of its batch. Sequence-level heads (classification, regression, multi-label, QA) average
per-example losses over the batch, so batch size times their loss is the sum of per-example losses.
Token-level losses (causal LM, token classification, seq2seq) do not: transformers averages over
every token of the batch, which weights each example by its share of the batch's tokens. For those
the loss is recomputed here: each example's own token mean, then summed.

With the per-example gradient hooks in "sum" mode, example i's recorded gradient is then exactly
the gradient of its own loss; the DP optimizer divides the noisy sum by the expected batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional

IGNORE_INDEX = -100


def summed_example_losses(
    model: nn.Module, inputs: Mapping[str, Any], batch_size: int, causal_lm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the batch of per-example losses, the per-example losses detached) for one forward pass.

    `causal_lm`: token labels are shifted by one (the model predicts the next token).
    """
    labels = inputs.get("labels")
    if _is_token_level(labels):
        outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
        losses = token_mean_losses(_logits(outputs), labels, shift=causal_lm)
        return losses.sum(), losses.detach()
    outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
    if loss is None or loss.dim() != 0:
        raise ValueError(
            "Under DP the model must return a scalar loss that is the mean over the batch of per-example losses "
            "(transformers' task heads do); got "
            f"{None if loss is None else tuple(loss.shape)}. Pass labels in the dataset (column 'label' or 'labels')."
        )
    return loss * batch_size, loss.detach().expand(batch_size)


def token_mean_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Each example's mean cross-entropy over its own labelled tokens (0 for an example with none)."""
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"Token logits {tuple(logits.shape)} do not line up with token labels {tuple(labels.shape)}")
    per_token = functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels.shape)
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / counts.clamp(min=1)


def _is_token_level(labels: Any) -> bool:
    """Integer labels with a token axis: (batch, tokens). Multi-label targets are float, so they are not."""
    return (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 2
        and not torch.is_floating_point(labels)
        and labels.dtype != torch.bool
    )


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if logits.dim() != 3:
        raise ValueError(f"Token labels need token logits (batch, tokens, classes), got {tuple(logits.shape)}")
    return logits
