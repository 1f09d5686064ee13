"""One example, one gradient, for every task the trainer takes under DP: adding an example to a padded batch moves
the sum of clipped per-example gradients by at most the clip norm C, and leaves every other example's gradient as
it was.

Each case builds a tiny model with a LoRA adapter (B drawn at random, so A's gradients are not zero) and a task head,
a batch of short examples of different lengths padded as a user would pad it (transformers' collators), and the same
batch plus one long example, which pads every other example further. The per-example gradients are computed as the
trainer computes them: Opacus's hooks in "sum" mode, `summed_example_losses`, `fold_to_batch`; and clipped as the DP
optimizer clips them (flat, to C).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from peft import get_peft_model
from tiny import tiny_swin, tiny_vit
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    default_data_collator,
)

from hf_fedlora import FedLoraConfig
from hf_fedlora.federation.adapter_state import adapter_parameters
from hf_fedlora.models import BertMeanPoolingForSequenceClassification
from hf_fedlora.privacy import PerExampleGradients
from hf_fedlora.privacy.per_example_loss import summed_example_losses, with_own_positions

VOCAB = 64
NUM_LABELS = 3
SHORT_LENGTHS = [3, 5, 4, 6, 3]  # the batch: short examples of different lengths
LONG_LENGTH = 30  # the added example: pads every other one by 24 to 27 positions
RELATIVE = 1e-5  # padding may change BLAS blocking, so the last bits of a gradient
PAD = 0


def tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are the words' numbers; only its pad() is used (features are ids)."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    result = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", unk_token="w1")
    result.padding_side = padding_side
    return result


# ----------------------------------------------------------------------------------------
# Tiny models (every dropout 0: Opacus records activations in train mode only)
# ----------------------------------------------------------------------------------------
def bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=NUM_LABELS,
        pad_token_id=PAD,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def gpt2(model_class: type = GPT2LMHeadModel, **overrides) -> torch.nn.Module:
    """Absolute position embeddings: a left-padded example's positions depend on how far its row is padded."""
    kwargs = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=40, bos_token_id=2, eos_token_id=2)
    kwargs.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    return model_class(GPT2Config(**kwargs))


def llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=40,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------------------
# Examples per task: a feature dict per example, as a dataset row would give it
# ----------------------------------------------------------------------------------------
def token_ids(length: int, generator: torch.Generator) -> list[int]:
    return torch.randint(2, VOCAB, (length,), generator=generator).tolist()


def sequence_examples(targets: str) -> Callable[[int, int, torch.Generator], dict[str, Any]]:
    def make(index: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        ids = token_ids(length, generator)
        if targets == "single":
            label: Any = index % NUM_LABELS
        elif targets == "regression":
            label = float(torch.randn((), generator=generator))
        else:  # multi-label
            label = torch.randint(0, 2, (NUM_LABELS,), generator=generator).float().tolist()
        return {"input_ids": ids, "attention_mask": [1] * length, "labels": label}

    return make


def token_examples(index: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    labels = torch.randint(0, NUM_LABELS, (length,), generator=generator).tolist()
    labels[0] = -100  # e.g. [CLS], or a word's second sub-token
    return {"input_ids": token_ids(length, generator), "attention_mask": [1] * length, "labels": labels}


def qa_examples(index: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    """Answers inside the example; one unanswerable (at [CLS], as SQuAD v2) and one whose start lies past its own
    end, which transformers ignores for the example alone (clamped to the sequence length)."""
    start = int(torch.randint(0, length, (), generator=generator))
    end = int(torch.randint(start, length, (), generator=generator))
    if index == 1:
        start = end = 0
    if index == 2:
        start = length + 1  # within the padded batch's length: must still be ignored, not read as padding
    return {"input_ids": token_ids(length, generator), "start_positions": start, "end_positions": end}


def lm_examples(index: int, length: int, generator: torch.Generator) -> dict[str, Any]:
    ids = token_ids(length, generator)
    prompt = max(1, length // 3)
    return {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * prompt + ids[prompt:]}


def image_examples(size: int) -> Callable[[int, int, torch.Generator], dict[str, Any]]:
    def make(index: int, length: int, generator: torch.Generator) -> dict[str, Any]:
        return {"pixel_values": torch.randn(3, size, size, generator=generator), "labels": index % NUM_LABELS}

    return make


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    targets: list[str]
    task_type: str | None
    example: Callable[[int, int, torch.Generator], dict[str, Any]]
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    causal_lm: bool = False


CASES = {
    "bert-seq-cls": Case(
        lambda: BertForSequenceClassification(bert_config()),
        ["query", "value"],
        "SEQ_CLS",
        sequence_examples("single"),
        DataCollatorWithPadding(tokenizer()),
    ),
    "bert-regression": Case(
        lambda: BertForSequenceClassification(bert_config(num_labels=1)),
        ["query", "value"],
        "SEQ_CLS",
        sequence_examples("regression"),
        DataCollatorWithPadding(tokenizer()),
    ),
    "bert-multi-label": Case(
        lambda: BertForSequenceClassification(bert_config(problem_type="multi_label_classification")),
        ["query", "value"],
        "SEQ_CLS",
        sequence_examples("multi-label"),
        DataCollatorWithPadding(tokenizer()),
    ),
    "bert-mean-pooling": Case(
        lambda: BertMeanPoolingForSequenceClassification(bert_config()),
        ["query", "value"],
        "SEQ_CLS",
        sequence_examples("single"),
        DataCollatorWithPadding(tokenizer()),
    ),
    "gpt2-seq-cls": Case(  # reads the last token that is not padding; absolute positions, padded on the right
        lambda: gpt2(GPT2ForSequenceClassification, num_labels=NUM_LABELS, pad_token_id=PAD),
        ["c_attn"],
        "SEQ_CLS",
        sequence_examples("single"),
        DataCollatorWithPadding(tokenizer()),
    ),
    "bert-token-cls": Case(
        lambda: BertForTokenClassification(bert_config()),
        ["query", "value"],
        "TOKEN_CLS",
        token_examples,
        DataCollatorForTokenClassification(tokenizer()),
    ),
    "bert-qa": Case(
        lambda: BertForQuestionAnswering(bert_config(num_labels=2)),  # start and end logits
        ["query", "value"],
        "QUESTION_ANS",
        qa_examples,
        DataCollatorWithPadding(tokenizer()),
    ),
    "gpt2-left-padding": Case(  # absolute positions; a stock collator passes no position ids
        gpt2, ["c_attn"], "CAUSAL_LM", lm_examples, DataCollatorForSeq2Seq(tokenizer("left")), causal_lm=True
    ),
    "gpt2-right-padding": Case(
        gpt2, ["c_attn"], "CAUSAL_LM", lm_examples, DataCollatorForSeq2Seq(tokenizer("right")), causal_lm=True
    ),
    "llama-left-padding": Case(
        llama, ["q_proj", "v_proj"], "CAUSAL_LM", lm_examples, DataCollatorForSeq2Seq(tokenizer("left")), True
    ),
    "vit": Case(tiny_vit, ["q_proj", "v_proj"], None, image_examples(8), default_data_collator),
    "swin": Case(tiny_swin, ["q_proj", "v_proj"], None, image_examples(16), default_data_collator),
}


def adapted(case: Case) -> torch.nn.Module:
    """The case's model with a LoRA adapter (A and B trained, B random) and a trainable head, in train mode."""
    torch.manual_seed(0)
    extra = {} if case.task_type else {"modules_to_save": ["classifier"]}
    config = FedLoraConfig(r=4, lora_alpha=8, target_modules=case.targets, task_type=case.task_type, **extra)
    model = get_peft_model(case.build(), config)
    with torch.no_grad():
        for name, parameter in adapter_parameters(model).items():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.3)
    return model.train()


def batches(case: Case) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the short examples padded together, the same plus one long example)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [*SHORT_LENGTHS, LONG_LENGTH]
    features = [case.example(i, length, generator) for i, length in enumerate(lengths)]
    return case.collator(features[:-1]), case.collator(features)


def per_example_gradients(model: torch.nn.Module, inputs: dict[str, Any], causal_lm: bool) -> torch.Tensor:
    """One row per example: its gradient over every adapter tensor, as the trainer's DP path records it."""
    trainable = adapter_parameters(model)
    assert all(parameter.requires_grad for parameter in trainable.values())
    size = len(next(value for value in inputs.values() if isinstance(value, torch.Tensor)))
    hooks = PerExampleGradients(model)
    hooks.attach_for(frozenset(trainable))
    try:
        loss, _ = summed_example_losses(model, inputs, size, causal_lm)
        loss.backward()
        hooks.fold_to_batch(size)
        rows = torch.cat([p.grad_sample.reshape(size, -1) for p in trainable.values()], dim=1)
    finally:
        hooks.remove()
        for parameter in trainable.values():
            parameter.grad, parameter.grad_sample = None, None
    return rows.detach()


def clipped(rows: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus's flat clipping: each row scaled by min(1, C / (||row|| + 1e-6))."""
    return rows * (clip / (rows.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1.0)


@pytest.mark.parametrize("name", list(CASES))
def test_adding_one_example_moves_the_clipped_sum_by_at_most_c(name):
    case = CASES[name]
    model = adapted(case)
    small, large = batches(case)
    if "attention_mask" in small:
        assert not bool(small["attention_mask"].all()), "the batch must really be padded"
    before = per_example_gradients(model, small, case.causal_lm)
    after = per_example_gradients(model, large, case.causal_lm)
    assert before.shape[0] == len(SHORT_LENGTHS) and after.shape[0] == len(SHORT_LENGTHS) + 1
    assert bool((before.norm(dim=1) > 0).all()), "an example without gradient would make the check vacuous"

    # (b) Every other example's gradient is what it was: so is its clipped gradient, for any C.
    change = (after[:-1] - before).norm(dim=1) / before.norm(dim=1)
    assert float(change.max()) <= RELATIVE, f"{name}: an example's gradient moved by {change.tolist()} (relative)"

    # (a) The released sum moves by at most C: every example clipped (only directions count), and none clipped.
    norms = torch.cat([before.norm(dim=1), after.norm(dim=1)])
    for clip in (0.05 * float(norms.min()), 2.0 * float(norms.max())):
        moved = float((clipped(after, clip).sum(dim=0) - clipped(before, clip).sum(dim=0)).norm())
        assert moved <= clip * (1 + RELATIVE), f"{name}: the clipped sum moved by {moved / clip:.3f} C"


# ----------------------------------------------------------------------------------------
# The per-example losses behind it
# ----------------------------------------------------------------------------------------
def example_losses(model: torch.nn.Module, inputs: dict[str, Any], causal_lm: bool) -> torch.Tensor:
    with torch.no_grad():
        size = len(inputs["input_ids"])
        return summed_example_losses(model, inputs, size, causal_lm)[1]


@pytest.mark.parametrize("name", ["bert-qa", "bert-token-cls", "gpt2-left-padding", "llama-left-padding"])
def test_each_examples_loss_in_a_padded_batch_is_its_loss_alone(name):
    case = CASES[name]
    model = adapted(case)
    generator = torch.Generator().manual_seed(1)
    features = [case.example(i, length, generator) for i, length in enumerate([*SHORT_LENGTHS, LONG_LENGTH])]
    batch = example_losses(model, case.collator(features), case.causal_lm)
    alone = torch.cat([example_losses(model, case.collator([feature]), case.causal_lm) for feature in features])
    assert bool((alone > 0).all())
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)


def test_question_answering_loss_of_an_example_alone_is_transformers_loss():
    """(CE(start) + CE(end)) / 2 as BertForQuestionAnswering computes it for one unpadded example; an answer past the
    example's end is ignored: the term adds 0 (transformers' mean over no answer would be NaN)."""
    case = CASES["bert-qa"]
    model = adapted(case)
    generator = torch.Generator().manual_seed(1)
    for index, length in enumerate(SHORT_LENGTHS):
        inputs = case.collator([case.example(index, length, generator)])
        ours = example_losses(model, inputs, causal_lm=False)
        with torch.no_grad():
            outputs = model(**inputs)
        theirs = outputs.loss
        if index == 2:  # its start lies past its end: only the end term counts
            assert torch.isnan(theirs)
            theirs = torch.nn.functional.cross_entropy(outputs.end_logits, inputs["end_positions"]) / 2
        torch.testing.assert_close(ours, theirs.reshape(1))


def test_question_answering_padded_on_the_left_is_refused_with_the_fix():
    case = CASES["bert-qa"]
    generator = torch.Generator().manual_seed(1)
    features = [case.example(i, length, generator) for i, length in enumerate(SHORT_LENGTHS)]
    with pytest.raises(ValueError, match="padding_side = 'right'"):
        summed_example_losses(adapted(case), DataCollatorWithPadding(tokenizer("left"))(features), 5, False)


@pytest.mark.parametrize("name", ["gpt2-seq-cls", "bert-token-cls"])
def test_other_tasks_padded_on_the_left_without_position_ids_are_refused_with_the_fix(name):
    """Outside causal LMs no position ids are made up (RoBERTa counts from its padding index): a left-padded batch
    for a model that takes them is refused, as GPT-2's absolute positions would shift with the longest example."""
    case = CASES[name]
    generator = torch.Generator().manual_seed(1)
    features = [case.example(i, length, generator) for i, length in enumerate(SHORT_LENGTHS)]
    collator = type(case.collator)(tokenizer("left"))
    with pytest.raises(ValueError, match="padded on the left without position ids.*padding_side = 'right'"):
        summed_example_losses(adapted(case), collator(features), len(features), causal_lm=False)
    positioned = with_own_positions(gpt2(), collator(features))  # given position ids, the batch is taken
    summed_example_losses(adapted(case), positioned, len(features), causal_lm=False)


class NoPositions(torch.nn.Module):
    """A causal LM whose forward takes no position ids (as BLOOM's, with ALiBi)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": torch.zeros(*input_ids.shape, VOCAB, requires_grad=True)}


def test_position_ids_are_added_only_where_missing_and_the_model_takes_them():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": mask}
    added = with_own_positions(adapted(CASES["gpt2-left-padding"]), inputs)
    assert added["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    given = {**inputs, "position_ids": torch.arange(4).expand(2, 4)}
    assert with_own_positions(gpt2(), given) is given
    assert with_own_positions(NoPositions(), inputs) is inputs
    summed_example_losses(NoPositions(), {**inputs, "labels": torch.ones_like(mask)}, 2, causal_lm=True)
