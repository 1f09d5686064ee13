"""The loss DP-SGD backpropagates: the sum over the batch of each example's own loss.

DP-SGD clips each example's gradient, so an example's gradient must not depend on the other
examples of its batch. Sequence-level heads (classification, regression, multi-label) average
per-example losses over the batch, so batch size times their loss is the sum of per-example losses.
Other losses are recomputed here, each example over its own tokens only:
- token-level losses (causal LM, token classification, seq2seq): transformers averages over every
  token of the batch, which weights each example by its share of the batch's tokens; here each
  example's own token mean, then summed;
- question answering: transformers' softmax over start (end) positions runs over every position
  of the padded batch, and its mean leaves out ignored answers of other examples; here each
  example's softmax covers its own positions only (padding masked);
- causal LMs without `position_ids`: a model with absolute positions (GPT-2) would number a
  left-padded example from the batch's longest example; here positions count each example's own
  tokens, as `generate` numbers them. Other tasks' left-padded batches without position ids are
  refused (their models do not all number positions from 0).

With the per-example gradient hooks in "sum" mode, example i's recorded gradient is then exactly
the gradient of its own loss; the DP optimizer divides the noisy sum by the expected batch size.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional

IGNORE_INDEX = -100
QA_TARGETS = ("start_positions", "end_positions")


def summed_example_losses(
    model: nn.Module, inputs: Mapping[str, Any], batch_size: int, causal_lm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the batch of per-example losses, the per-example losses detached) for one forward pass.

    `causal_lm`: token labels are shifted by one (the model predicts the next token), and positions are counted
    over each example's own tokens when the batch has an attention mask but no position ids.
    """
    if causal_lm:
        inputs = with_own_positions(model, inputs)
    if all(key in inputs for key in QA_TARGETS):
        outputs = model(**{key: value for key, value in inputs.items() if key not in QA_TARGETS})
        start_logits, end_logits = _qa_logits(outputs)
        losses = question_answering_losses(
            start_logits, end_logits, inputs["start_positions"], inputs["end_positions"], inputs.get("attention_mask")
        )
        return losses.sum(), losses.detach()
    if not causal_lm:
        check_no_shifted_positions(model, inputs)
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


def with_own_positions(model: nn.Module, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The inputs with `position_ids` counted over each example's own tokens (0 at its first unmasked token), when
    they carry an attention mask but no position ids and the model's forward takes them; else the inputs as given.

    Without them a model with absolute position embeddings (GPT-2) numbers a left-padded example's tokens from the
    start of the padded row, so its positions, and its gradient, depend on the batch's longest example. Counted over
    the mask they are what `generate` passes (0..L-1 for the example's tokens; padding, which no token attends to,
    gets 0); for an unpadded row they are the model's own default, 0..L-1.
    """
    mask = inputs.get("attention_mask")
    if inputs.get("position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return inputs
    if not _forward_takes(model, "position_ids"):
        return inputs
    return {**inputs, "position_ids": (mask.long().cumsum(dim=-1) - 1).clamp(min=0)}


def check_no_shifted_positions(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    """Refuse a left-padded batch without position ids for a model that takes them (outside causal LMs).

    Such a model numbers positions from the start of the padded row, so with absolute position embeddings
    (GPT2ForSequenceClassification) an example's positions depend on its batch's longest example. Outside causal
    LMs the default numbering is not always 0..L-1 (RoBERTa counts from its padding index), so no position ids are
    made up here: the batch is refused and the fix named.
    """
    mask = inputs.get("attention_mask")
    if inputs.get("position_ids") is not None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return
    if _left_padded(mask) and _forward_takes(model, "position_ids"):
        raise ValueError(
            "Under DP this batch is padded on the left without position ids: the model numbers positions from the "
            "start of each padded row, so with absolute position embeddings (e.g. GPT-2) an example's gradient "
            "would depend on the length of the longest example of its batch. Pad on the right "
            "(tokenizer.padding_side = 'right', for the collator too), or have the collator pass position_ids "
            "counted over each example's own tokens."
        )


def question_answering_losses(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Each example's (CE(start) + CE(end)) / 2, as transformers computes it for that example alone.

    Each softmax runs over the example's own positions (attention mask 1); logits at its padding are masked out.
    A position is clamped at 0, and one past the example's own tokens is ignored (transformers clamps to the
    sequence length and ignores that index): an ignored term adds 0 (transformers, averaging over the batch's
    answers, would give NaN for an example alone and let an example's weight depend on the others' answers).
    Start and end positions index the padded row, so the batch must be padded on the right (or not at all).
    """
    own = torch.ones(start_logits.shape, dtype=torch.bool, device=start_logits.device)
    if attention_mask is not None:
        own = attention_mask.to(start_logits.device).bool()
        if _left_padded(own):
            raise ValueError(
                "Question answering under DP needs batches padded on the right: start and end positions index "
                "the padded sequence, so padding on the left would move an example's answer with the length of "
                "the longest example of its batch. Set tokenizer.padding_side = 'right' (for the collator too)."
            )
    start = _position_losses(start_logits, start_positions, own)
    end = _position_losses(end_logits, end_positions, own)
    return (start + end) / 2


def _position_losses(logits: torch.Tensor, positions: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row's position over its own positions; 0 where the position is ignored."""
    logits = logits.float().masked_fill(~own, torch.finfo(torch.float32).min)
    length = logits.shape[1]
    positions = positions.reshape(len(logits)).to(logits.device).long().clamp(0, length)
    inside = positions < length
    valid = inside & own.gather(1, positions.clamp(max=length - 1).unsqueeze(1)).squeeze(1)
    targets = torch.where(valid, positions, torch.full_like(positions, IGNORE_INDEX))
    return functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


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


def _left_padded(mask: torch.Tensor) -> bool:
    """Whether some row has padding (0) before one of its tokens (1)."""
    mask = mask.bool()
    return bool((mask[:, 1:] & ~mask[:, :-1]).any())


def _forward_takes(model: nn.Module, argument: str) -> bool:
    """Whether the underlying model's forward names `argument` (a PEFT model passes extra arguments through)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return argument in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        return False


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


def _qa_logits(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, Mapping):
        return outputs["start_logits"], outputs["end_logits"]
    return outputs[0], outputs[1]
