"""Instruction data for causal LMs: chat-templated examples whose prompt tokens carry no loss, and their collator.

Under DP each example's loss is the mean over its own answer tokens (labels other than -100), so
the prompt must be masked in the labels, not in the loss: a masked token then contributes nothing
to the loss or to any gradient. Two dataset shapes are accepted, as in TRL: conversational
(`messages`: a list of {"role", "content"}; every assistant turn is an answer) and prompt/completion
(plain strings, or lists of messages rendered with the chat template).

Padding: `InstructionDataCollator` is transformers' `DataCollatorForSeq2Seq` (labels padded with
-100, on `tokenizer.padding_side`). With left padding it also passes `position_ids` counted over
each example's own tokens, so an example sits at positions 0..L-1 whatever its batch, exactly as
alone: its per-example gradient does not depend on the other examples (models with absolute
position embeddings, such as GPT-2, would otherwise see shifted positions).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

IGNORE_INDEX = -100
MESSAGES, PROMPT, COMPLETION = "messages", "prompt", "completion"


# ----------------------------------------------------------------------------------------
# Tokenisation: prompt tokens masked in the labels
# ----------------------------------------------------------------------------------------
def tokenize_instructions(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    messages_column: str = MESSAGES,
    prompt_column: str = PROMPT,
    completion_column: str = COMPLETION,
) -> Dataset:
    """`input_ids`, `attention_mask` and `labels` (prompt tokens -100) for every example; other columns dropped.

    `max_length` truncates from the right. Fails, naming the example, if an example keeps no answer
    token a causal LM can be trained on (the first token is never predicted), so nothing trains on it.
    """
    columns = dataset.column_names
    if messages_column in columns:
        _require_chat_template(tokenizer, f"the dataset's {messages_column!r} column")
        segment = lambda row: _conversation_segments(row[messages_column], tokenizer)  # noqa: E731
    elif prompt_column in columns and completion_column in columns:

        def segment(row: Mapping[str, Any]) -> list[tuple[str | list[int], bool, bool]]:
            return _prompt_completion_segments(row[prompt_column], row[completion_column], tokenizer)

    else:
        raise ValueError(
            f"The dataset needs a {messages_column!r} column (conversations) or {prompt_column!r} and "
            f"{completion_column!r} columns; it has {columns}. Rename the columns (dataset.rename_column) or "
            "pass messages_column / prompt_column / completion_column."
        )

    def encode(row: Mapping[str, Any], index: int) -> dict[str, list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for piece, is_answer, special in segment(row):
            ids = piece if isinstance(piece, list) else tokenizer(piece, add_special_tokens=special)["input_ids"]
            input_ids += ids
            labels += ids if is_answer else [IGNORE_INDEX] * len(ids)
        if max_length is not None:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # a causal LM never predicts the first token
            raise ValueError(
                f"Example {index} has no answer tokens left to train on after masking the prompt"
                + (f" and truncating to max_length={max_length}" if max_length is not None else "")
                + f" ({len(input_ids)} tokens, all prompt). Raise max_length, shorten the prompt, or drop the "
                "example; an example without answer tokens would only spend privacy budget."
            )
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    return dataset.map(encode, with_indices=True, remove_columns=columns, desc="Tokenizing instructions")


def _conversation_segments(
    messages: Sequence[Mapping[str, str]], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str, bool, bool]]:
    """(text, is_answer, add_special_tokens) pieces of a rendered conversation: each assistant turn is an answer.

    The text before assistant turn i is the template rendered up to it with the generation prompt, as at
    inference; the answer is what the full rendering adds after that (the reply and its end-of-turn token).
    """
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise ValueError(
                "The tokenizer's chat template does not render a conversation as a prefix of its continuation, so "
                "the prompt cannot be told from the answer. Use a template that appends turns (most do), or "
                "prompt/completion columns."
            )
        segments += [(before[len(done) :], False, False), (upto[len(before) :], True, False)]
        done = upto
    if not segments:
        raise ValueError("A conversation has no assistant message: there is nothing to train on")
    return segments


def _prompt_completion_segments(
    prompt: Any, completion: Any, tokenizer: PreTrainedTokenizerBase
) -> list[tuple[str | list[int], bool, bool]]:
    """Plain text: prompt (with the tokenizer's special tokens, e.g. BOS) then completion and EOS, so the model
    learns to stop. Conversational prompt/completion (lists of messages): rendered with the chat template."""
    if isinstance(prompt, str) and isinstance(completion, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [(prompt, False, True), (completion, True, False), (eos, True, False)]
    _require_chat_template(tokenizer, "conversational prompt/completion columns")
    return _conversation_segments(list(prompt) + list(completion), tokenizer)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool):
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _require_chat_template(tokenizer: PreTrainedTokenizerBase, what: str) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{what} need the tokenizer's chat template, but {type(tokenizer).__name__} has none "
            "(tokenizer.chat_template is None). Use an instruct model's tokenizer, set tokenizer.chat_template to a "
            "Jinja template, or give plain-text prompt/completion columns instead."
        )


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """A user question rendered as at training time, ready for generation (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return question
    return _render(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


# ----------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------
@dataclass
class InstructionDataCollator(DataCollatorForSeq2Seq):
    """transformers' `DataCollatorForSeq2Seq` (labels padded with -100 on `tokenizer.padding_side`), refusing a
    tokenizer without a pad token, and adding per-example `position_ids` when padding on the left."""

    def __post_init__(self) -> None:
        check_pad_token(self.tokenizer)

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        batch = super().__call__(features, return_tensors=return_tensors)
        if self.tokenizer.padding_side == "left" and isinstance(batch.get("attention_mask"), torch.Tensor):
            batch["position_ids"] = position_ids_from(batch["attention_mask"])
        return batch


def check_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad token; many causal-LM tokenizers ship without one."""
    if tokenizer.pad_token is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no pad token, so batches cannot be padded. Set one "
            "before building the collator, e.g. tokenizer.pad_token = tokenizer.eos_token (padded labels are -100, "
            "so the EOS the answers end with is still learned), or tokenizer.add_special_tokens({'pad_token': "
            "'<pad>'}) and model.resize_token_embeddings(len(tokenizer))."
        )


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over each row's own tokens (0 at its first real token), 0 on padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------
# Generation and exact match (GSM8K style: the final answer follows "####")
# ----------------------------------------------------------------------------------------
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_answer(text: str) -> str | None:
    """The number after the last "####" (GSM8K's answer marker), else the last number in the text, normalised
    (thousands separators dropped, "7.0" -> "7"); None when there is no number."""
    marked = _FINAL.findall(text)
    numbers = marked or _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".") or "0"
    return value


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """Greedy completions of already-templated prompts, batched with left padding (as generation needs)."""
    check_pad_token(tokenizer)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            special = getattr(tokenizer, "chat_template", None) is None  # a template already holds BOS
            encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=special)
            encoded = {key: value.to(model.device) for key, value in encoded.items()}
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return completions


def exact_match(completions: Sequence[str], references: Sequence[str]) -> float:
    """Share of completions whose final answer equals the reference's (both through `final_answer`)."""
    return _share_matching(
        completions, references, lambda c, r: final_answer(c) is not None and final_answer(c) == final_answer(r)
    )


# ----------------------------------------------------------------------------------------
# Short answers (a label, a word, a name): compared as text, not as numbers
# ----------------------------------------------------------------------------------------
_EDGE_PUNCTUATION = " \t\"'`.,;:!?()[]*"


def normalize_answer(text: str) -> str:
    """The first line of an answer, lower-cased, without surrounding quotes, brackets or punctuation: what a
    short-answer reference and a generation are compared by ("Positive." and "positive" are the same answer)."""
    lines = text.strip().splitlines()
    return (lines[0] if lines else "").strip(_EDGE_PUNCTUATION).lower()


def short_answer_match(completions: Sequence[str], references: Sequence[str]) -> float:
    """Share of completions whose normalised text equals the reference's: the strict score, which also asks the
    model to answer in the requested form (a label alone, not a sentence around it)."""
    return _share_matching(completions, references, lambda c, r: normalize_answer(c) == normalize_answer(r))


def first_named_choice(text: str, choices: Sequence[str]) -> str | None:
    """Which of `choices` a generation names first (as a whole word, case-insensitive); None when it names none."""
    lowered = text.lower()
    found = []
    for choice in choices:
        match = re.search(rf"(?<!\w){re.escape(choice.lower())}(?!\w)", lowered)
        if match:
            found.append((match.start(), -len(choice), choice))
    return min(found)[2] if found else None


def named_choice_match(completions: Sequence[str], references: Sequence[str]) -> float:
    """The lenient score when the answers come from a closed set (the references' distinct normalised values):
    share of completions whose first named choice is the reference. It credits a right answer inside a sentence
    ("The sentiment is negative"), so it separates what a model knows from the form it answers in."""
    choices = sorted({normalize_answer(r) for r in references})
    return _share_matching(completions, references, lambda c, r: first_named_choice(c, choices) == normalize_answer(r))


def _share_matching(completions: Sequence[str], references: Sequence[str], matches) -> float:
    """Share of (completion, reference) pairs for which `matches` holds; NaN when there are none."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions for {len(references)} references")
    if not references:
        return float("nan")
    return sum(bool(matches(c, r)) for c, r in zip(completions, references, strict=True)) / len(references)
