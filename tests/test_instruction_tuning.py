"""Causal-LM instruction tuning: masked prompts, exact per-example gradients with either padding, DP runs end to end."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from opacus.accountants import RDPAccountant
from peft import PeftModel, get_peft_model
from tiny import fed_args
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    DataCollatorForSeq2Seq,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hf_fedlora import DeerConfig, FederatedTrainer, FFALoraConfig
from hf_fedlora.hub import FEDERATED_RECORD_NAME
from hf_fedlora.instruction_data import (
    IGNORE_INDEX,
    InstructionDataCollator,
    chat_prompt,
    exact_match,
    final_answer,
    generate_completions,
    tokenize_instructions,
)
from hf_fedlora.methods import CONFIG_CLASSES
from hf_fedlora.privacy.per_example_loss import summed_example_losses

WORDS = "what is plus minus times the sum of and please answer a question about numbers".split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "####"]
VOCAB = SPECIAL + WORDS + [str(n) for n in range(40)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(chat_template: bool = True, pad: bool = True, padding_side: str = "right"):
    """A word-level tokenizer over a small vocabulary, with a simple chat template."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE if chat_template else None
    tokenizer.padding_side = padding_side
    return tokenizer


def chat_data(n: int, seed: int = 0) -> Dataset:
    """Addition questions of varying length (one to three terms) with GSM8K-style answers."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        terms = torch.randint(0, 10, (1 + i % 3,), generator=generator).tolist()
        question = "what is the sum of " + " and ".join(map(str, terms)) + (" please" * (i % 2))
        answer = " plus ".join(map(str, terms)) + f" #### {sum(terms)}"
        rows.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return Dataset.from_dict({"messages": rows})


def tiny_causal_lm(kind: str, config_cls=FFALoraConfig, seed: int = 0, adapter: bool = True):
    """A tiny Llama or GPT-2 from a config (same seed, same weights), with an hf_fedlora adapter unless told not."""
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=len(VOCAB),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        base, targets = LlamaForCausalLM(config), ["q_proj", "v_proj"]
    else:  # GPT-2: absolute position embeddings, the model left padding would break without position ids
        config = GPT2Config(
            vocab_size=len(VOCAB),
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        base, targets = GPT2LMHeadModel(config), ["c_attn"]
    if not adapter:
        return base
    return get_peft_model(base, config_cls(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))


def dp_trainer(tmp_path, model, tokenizer, data: Dataset, collator=None, **overrides) -> FederatedTrainer:
    args = dict(num_clients=None, dp_noise_multiplier=1.0)
    args.update(overrides)
    return FederatedTrainer(
        model,
        fed_args(tmp_path, **args),
        train_dataset=[data, data],
        data_collator=collator or InstructionDataCollator(tokenizer),
    )


def per_example_gradients(trainer: FederatedTrainer, data: Dataset, indices: list[int]) -> torch.Tensor:
    """The hooked per-example gradients of every trained tensor, one row per example."""
    trainer.model.train()
    trainer._backward_batch(data, indices)
    trained = trainer._trainable_parameters()
    rows = torch.cat([p.grad_sample.reshape(len(indices), -1) for p in trained], dim=1)
    for p in trained:
        p.grad_sample = None
        p.grad = None
    return rows.detach().clone()


def clipped_sum(rows: torch.Tensor, clip: float) -> torch.Tensor:
    factors = (clip / (rows.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return (rows * factors[:, None]).sum(dim=0)


def nonzero_b(model) -> None:
    """B starts at zero; make it random so gradients reach A and prompts and answers interact through LoRA."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


# ----------------------------------------------------------------------------------------
# One example, one gradient: padded, variable-length, partly masked chat batches
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_example_gradients_equal_one_example_passes(tmp_path, kind, padding_side):
    """Hooked per-example gradients on a batch the package's collator padded equal one-example backward passes, and
    adding one example moves the sum of clipped gradients by at most the clip norm."""
    tokenizer = tiny_tokenizer(padding_side=padding_side)
    data = tokenize_instructions(chat_data(6), tokenizer)
    lengths = [len(ids) for ids in data["input_ids"]]
    assert len(set(lengths[:4])) > 1  # the batch really is padded
    model = tiny_causal_lm(kind)
    trainer = dp_trainer(tmp_path, model, tokenizer, data)
    nonzero_b(trainer.model)
    batch = per_example_gradients(trainer, data, [0, 1, 2, 3])
    alone = torch.cat([per_example_gradients(trainer, data, [i]) for i in range(4)])
    assert batch.abs().max() > 0
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-6)

    clip = 0.05 * float(batch.norm(dim=1).min())  # every example is clipped: the tightest case
    with_one_more = per_example_gradients(trainer, data, [0, 1, 2, 3, 4])
    moved = (clipped_sum(with_one_more, clip) - clipped_sum(batch, clip)).norm()
    assert moved <= clip * (1 + 1e-4)


def test_gpt2_left_padded_by_a_stock_collator_counts_each_examples_own_positions(tmp_path):
    """GPT-2 (absolute positions) batched by transformers' collator alone, on the left and with no position ids:
    under DP the per-example loss numbers each example's tokens from its own first one, so its gradient is the one
    it has alone (without that it would depend on its batch's longest example: tests/test_example_sensitivity.py)."""
    tokenizer = tiny_tokenizer(padding_side="left")
    data = tokenize_instructions(chat_data(6), tokenizer)
    trainer = dp_trainer(tmp_path, tiny_causal_lm("gpt2"), tokenizer, data, collator=DataCollatorForSeq2Seq(tokenizer))
    assert "position_ids" not in trainer.data_collator([data[i] for i in range(4)])
    batch = per_example_gradients(trainer, data, [0, 1, 2, 3])
    alone = torch.cat([per_example_gradients(trainer, data, [i]) for i in range(4)])
    assert batch.abs().max() > 0
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Prompt tokens contribute nothing
# ----------------------------------------------------------------------------------------
def test_labels_mask_exactly_the_prompt():
    """Labels are -100 on the rendered prompt (as generation sees it) and the input ids on the answer."""
    tokenizer = tiny_tokenizer()
    conversations = chat_data(4)
    data = tokenize_instructions(conversations, tokenizer)
    for messages, ids, labels in zip(conversations["messages"], data["input_ids"], data["labels"], strict=True):
        prompt = tokenizer(chat_prompt(tokenizer, messages[0]["content"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(messages[1]["content"] + " <|end|>")["input_ids"]
        assert ids == prompt + answer
        assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_prompt_tokens_contribute_nothing_to_loss_or_gradients(tmp_path):
    """The DP loss of each example, and each of its gradients, equal those of the answer-only loss computed by hand
    (cross-entropy over answer positions alone); unmasking the prompt would change them."""
    tokenizer = tiny_tokenizer()
    conversations = chat_data(4)
    data = tokenize_instructions(conversations, tokenizer)
    trainer = dp_trainer(tmp_path, tiny_causal_lm("llama"), tokenizer, data)
    nonzero_b(trainer.model)
    model, trained = trainer.model, trainer._trainable_parameters()
    model.train()
    inputs = trainer.data_collator([data[i] for i in range(4)])
    _, losses = summed_example_losses(model, inputs, 4, causal_lm=True)

    for i, messages in enumerate(conversations["messages"]):
        prompt_length = len(
            tokenizer(chat_prompt(tokenizer, messages[0]["content"]), add_special_tokens=False)["input_ids"]
        )
        ids = torch.tensor([data[i]["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        # token t is predicted at position t - 1: the answer tokens are t = prompt_length .. end
        reference = torch.nn.functional.cross_entropy(logits[prompt_length - 1 : -1], ids[0, prompt_length:])
        expected_grads = torch.autograd.grad(reference, trained)
        torch.testing.assert_close(losses[i], reference.detach(), rtol=1e-5, atol=1e-6)

        one = {key: torch.tensor([data[i][key]]) for key in ("input_ids", "attention_mask", "labels")}
        loss, _ = summed_example_losses(model, one, 1, causal_lm=True)
        for got, want in zip(torch.autograd.grad(loss, trained), expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

        unmasked = dict(one, labels=one["input_ids"])  # the prompt as a target: a different loss
        assert not torch.isclose(summed_example_losses(model, unmasked, 1, causal_lm=True)[0], loss)


# ----------------------------------------------------------------------------------------
# A DP federated run end to end, and the adapter in plain peft
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_cls", [FFALoraConfig, DeerConfig])
def test_two_round_dp_federated_run_saves_an_adapter_plain_peft_generates_with(tmp_path, config_cls):
    tokenizer = tiny_tokenizer()
    data = tokenize_instructions(chat_data(48), tokenizer)
    model = tiny_causal_lm("llama", config_cls)
    trainer = FederatedTrainer(
        model,
        fed_args(
            tmp_path,
            num_clients=2,
            num_rounds=2,
            local_steps=2,
            per_device_train_batch_size=4,
            learning_rate=0.5,
            dp_noise_multiplier=1.0,
        ),
        train_dataset=data,
        data_collator=InstructionDataCollator(tokenizer),
        processing_class=tokenizer,
    )
    a_before = {k: v.clone() for k, v in trainer.global_state().items() if ".lora_A." in k}
    metrics = trainer.train().metrics
    trainer.save_model()

    report = trainer.privacy_report()
    assert report["unit"] == "example" and 0 < metrics["epsilon"] < float("inf")
    for client in report["clients"].values():
        assert client["steps"] == 2 * 2 * trainer.method.num_sub_rounds(0)
        accountant = RDPAccountant()
        accountant.history = [tuple(entry) for entry in client["history"]]
        assert client["epsilon"] == pytest.approx(accountant.get_epsilon(report["delta"]), rel=1e-9)
    assert json.loads((tmp_path / FEDERATED_RECORD_NAME).read_text())["privacy"]["epsilon"] == metrics["epsilon"]
    trained_a = any(not torch.equal(a_before[k], trainer.global_state()[k]) for k in a_before)
    assert trained_a == (config_cls is DeerConfig)  # FFA-LoRA never moves A; DEeR's second sub-round does
    assert all(trainer.global_state()[k].any() for k in trainer.global_state() if ".lora_B." in k)

    base = tiny_causal_lm("llama", adapter=False)  # same seed: the same base weights, as a fresh process builds them
    loaded = PeftModel.from_pretrained(base, str(tmp_path))  # plain peft: no hf_fedlora config involved
    prompts = [chat_prompt(tokenizer, "what is the sum of 3 and 4"), chat_prompt(tokenizer, "what is 2 plus 2")]
    encoded = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encoded).logits, trainer.model(**encoded).logits)
    completions = generate_completions(loaded, tokenizer, prompts, max_new_tokens=6)
    assert len(completions) == 2  # (a DP-trained tiny model may well stop at once: only equality is asserted)
    assert completions == generate_completions(trainer.model, tokenizer, prompts, max_new_tokens=6)


def test_batched_left_padded_generation_matches_one_by_one():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    nonzero_b(model)
    prompts = [chat_prompt(tokenizer, q) for q in ["what is 3", "what is the sum of 1 and 2 and 3 please"]]
    batched = generate_completions(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    alone = [generate_completions(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    assert tokenizer.padding_side == "right"  # restored after generation


# ----------------------------------------------------------------------------------------
# Bad input fails before training, saying what to do
# ----------------------------------------------------------------------------------------
def test_an_example_without_answer_tokens_is_named():
    tokenizer = tiny_tokenizer()
    data = chat_data(3)
    long_prompt = [{"role": "user", "content": "what is " * 20 + "3"}, {"role": "assistant", "content": "#### 3"}]
    data = Dataset.from_dict({"messages": data["messages"][:1] + [long_prompt] + data["messages"][1:]})
    with pytest.raises(ValueError, match=r"Example 1 has no answer tokens.*max_length=16"):
        tokenize_instructions(data, tokenizer, max_length=16)
    empty = Dataset.from_dict({"prompt": ["what is 3", "what is 4"], "completion": ["#### 3", ""]})
    tokenizer.eos_token = None  # without EOS, an empty completion leaves nothing to learn
    with pytest.raises(ValueError, match="Example 1 has no answer tokens"):
        tokenize_instructions(empty, tokenizer)


def test_a_tokenizer_without_pad_token_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer\.pad_token = tokenizer\.eos_token"):
        InstructionDataCollator(tiny_tokenizer(pad=False))


def test_a_chat_dataset_needs_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        tokenize_instructions(chat_data(2), tiny_tokenizer(chat_template=False))


def test_plain_prompt_completion_works_without_a_template():
    """Plain-text prompt/completion (e.g. GPT-2): prompt masked, completion and EOS learned."""
    tokenizer = tiny_tokenizer(chat_template=False)
    data = tokenize_instructions(
        Dataset.from_dict({"prompt": ["what is 3 plus 4"], "completion": ["#### 7"]}), tokenizer
    )
    assert data[0]["input_ids"] == tokenizer("what is 3 plus 4 #### 7 </s>")["input_ids"]
    assert data[0]["labels"] == [IGNORE_INDEX] * 5 + tokenizer("#### 7 </s>")["input_ids"]


# ----------------------------------------------------------------------------------------
# GSM8K-style exact match
# ----------------------------------------------------------------------------------------
def test_final_answer_reads_gsm8k_markers_and_falls_back_to_the_last_number():
    assert final_answer("3 + 4 = 7 apples\n#### 1,234") == "1234"
    assert final_answer("so she has 12 left. The answer is 15.0") == "15"
    assert final_answer("no number here") is None
    assert final_answer("#### -3") == "-3"
    completions = ["... #### 7", "the answer is 8", "nothing", "#### 10"]
    assert exact_match(completions, ["x\n#### 7", "#### 9", "#### 1", "#### 10.00"]) == 0.5


@pytest.mark.parametrize("unit", ["example", "client"])
@pytest.mark.parametrize("config_cls", CONFIG_CLASSES, ids=lambda c: c.method_class.name)
def test_every_method_and_privacy_unit_trains_a_causal_lm_on_chat_data(tmp_path, config_cls, unit):
    """One DP round of each registered method under each unit of privacy moves the adapter and reports epsilon."""
    tokenizer = tiny_tokenizer(padding_side="left")
    data = tokenize_instructions(chat_data(16), tokenizer)
    trainer = FederatedTrainer(
        tiny_causal_lm("llama", config_cls),
        fed_args(
            tmp_path,
            num_clients=2,
            num_rounds=1,
            local_steps=1,
            per_device_train_batch_size=4,
            dp_noise_multiplier=1.0,
            dp_unit=unit,
        ),
        train_dataset=data,
        data_collator=InstructionDataCollator(tokenizer),
    )
    before = {k: v.clone() for k, v in trainer.global_state().items()}
    metrics = trainer.train().metrics
    assert metrics["epsilon"] > 0 and trainer.privacy_report()["unit"] == unit
    assert any(not torch.equal(before[k], trainer.global_state()[k]) for k in before)
