"""The published epsilon holds: each test here reproduces one way a privacy review broke it (issue 7)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset
from opacus.accountants import RDPAccountant
from peft import PeftModel, get_peft_model
from tiny import VOCAB, fed_args, tiny_bert, tiny_peft, toy_dataset
from transformers import BertConfig, BertForTokenClassification, LlamaConfig, LlamaForCausalLM

from hf_fedlora import FederatedTrainer, FedLoraConfig, FFALoraConfig
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME


def record_batches(trainer: FederatedTrainer) -> list[list[int]]:
    """Every batch of example indices the trainer draws, in order."""
    batches: list[list[int]] = []
    original = trainer._local_step

    def recording(data, indices, optimizer):
        batches.append(list(indices))
        return original(data, indices, optimizer)

    trainer._local_step = recording
    return batches


def dp_run(tmp_path, **overrides) -> tuple[FederatedTrainer, list[list[int]]]:
    args = dict(num_rounds=2, local_steps=3, dp_noise_multiplier=1.0)
    args.update(overrides)
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, **args), train_dataset=toy_dataset(200))
    batches = record_batches(trainer)
    trainer.train()
    return trainer, batches


# ----------------------------------------------------------------------------------------
# 1. Batch membership is secret
# ----------------------------------------------------------------------------------------
def test_batches_cannot_be_rebuilt_from_the_published_seed(tmp_path):
    """Two runs with the same published arguments (seed, partition) draw different Poisson batches."""
    _, first = dp_run(tmp_path / "a")
    _, second = dp_run(tmp_path / "b")
    assert len(first) == len(second) == 12
    assert first != second


def test_secret_seed_reproduces_a_run_and_is_never_published(tmp_path, caplog):
    """dp_secret_seed makes sampling and noise repeatable, leaves no trace in what is published, and the card
    and the log say the guarantee then rests on the seed staying secret."""
    secret = 918273645
    with caplog.at_level(logging.WARNING, logger="hf_fedlora.trainer"):
        first, first_batches = dp_run(tmp_path / "a", dp_secret_seed=secret)
    second, second_batches = dp_run(tmp_path / "b", dp_secret_seed=secret)
    assert first_batches == second_batches
    assert all(torch.equal(first.global_state()[k], second.global_state()[k]) for k in first.global_state())
    assert "only while that seed stays secret" in caplog.text

    first.save_model()
    published = [
        (tmp_path / "a" / CARD_NAME).read_text(),
        (tmp_path / "a" / FEDERATED_RECORD_NAME).read_text(),
        json.dumps(first.args.to_dict()),
        first.args.to_json_string(),
        json.dumps(first.args.to_sanitized_dict()),
        json.dumps(first.state.log_history),
    ]
    assert all(str(secret) not in text for text in published)
    assert first.privacy_report()["seeded"] is True
    assert "drawn from a secret seed" in published[0] and "only while that seed stays secret" in published[0]


def test_a_run_without_secret_seed_says_nothing_about_one(tmp_path):
    trainer, _ = dp_run(tmp_path)
    trainer.save_model()
    assert trainer.privacy_report()["seeded"] is False
    assert "secret seed" not in (tmp_path / CARD_NAME).read_text()


# ----------------------------------------------------------------------------------------
# 2. One example, one gradient, for token-level tasks
# ----------------------------------------------------------------------------------------
PAD = 0


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config)
    return get_peft_model(model, FFALoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def tiny_token_classifier(num_labels: int = 3):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return get_peft_model(
        BertForTokenClassification(config),
        FFALoraConfig(r=4, target_modules=["query", "value"], task_type="TOKEN_CLS"),
    )


def padded_token_dataset(lengths: list[int], width: int, causal: bool, seed: int = 0) -> Dataset:
    """Right-padded examples of different lengths; padding and (for causal LM) a 2-token prompt carry -100."""
    generator = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for length in lengths:
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        if causal:
            labels = [-100, -100] + ids[2:]
        else:
            labels = torch.randint(0, 3, (length,), generator=generator).tolist()
        pad = width - length
        rows["input_ids"].append(ids + [PAD] * pad)
        rows["attention_mask"].append([1] * length + [0] * pad)
        rows["labels"].append(labels + [-100] * pad)
    return Dataset.from_dict(rows)


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


@pytest.mark.parametrize("task", ["causal_lm", "token_classification"])
def test_token_task_per_example_gradients_are_each_examples_own(tmp_path, task):
    """Hooked per-example gradients in a padded, variable-length batch equal one-example backward passes, and
    adding one example moves the sum of clipped gradients by at most the clip norm."""
    causal = task == "causal_lm"
    model = tiny_llama() if causal else tiny_token_classifier()
    data = padded_token_dataset([3, 7, 12, 5, 16], width=16, causal=causal)
    trainer = FederatedTrainer(
        model, fed_args(tmp_path, num_clients=None, dp_noise_multiplier=1.0), train_dataset=[data, data]
    )
    batch = per_example_gradients(trainer, data, [0, 1, 2, 3])
    alone = torch.cat([per_example_gradients(trainer, data, [i]) for i in range(4)])
    assert batch.abs().max() > 0
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-6)

    clip = 0.05 * float(batch.norm(dim=1).min())  # every example is clipped: the tightest case
    with_long = per_example_gradients(trainer, data, [0, 1, 2, 3, 4])  # the 16-token example joins
    moved = (clipped_sum(with_long, clip) - clipped_sum(batch, clip)).norm()
    assert moved <= clip * (1 + 1e-4)


# ----------------------------------------------------------------------------------------
# 3. Only what the guarantee covers is published
# ----------------------------------------------------------------------------------------
def test_private_run_publishes_no_unprotected_statistics_by_default(tmp_path):
    trainer, _ = dp_run(tmp_path, logging_strategy="steps", logging_steps=1)
    uploads_losses = trainer.local_round("client_0", 0, 0, 1)[1]
    trainer.save_model()
    record = json.loads((tmp_path / FEDERATED_RECORD_NAME).read_text())
    card = (tmp_path / CARD_NAME).read_text()

    assert uploads_losses == []  # a client's raw losses never reach the server
    assert record["client_label_histograms"] == {}
    assert record["unprotected_statistics_published"] is False
    assert all("train_loss" not in entry for entry in record["round_history"])
    assert all("train_loss" not in entry or "epsilon" not in entry for entry in trainer.state.log_history)
    assert "Train loss" not in card and "label 0" not in card
    assert "Client sizes are treated as public" in card


def test_unprotected_statistics_on_request_are_listed_as_not_covered(tmp_path):
    trainer, _ = dp_run(tmp_path, publish_unprotected_statistics=True)
    trainer.save_model()
    record = json.loads((tmp_path / FEDERATED_RECORD_NAME).read_text())
    card = (tmp_path / CARD_NAME).read_text()
    assert record["client_label_histograms"] and record["unprotected_statistics_published"] is True
    assert all("train_loss" in entry for entry in record["round_history"])
    assert "Published on request and **not** covered" in card and "Train loss" in card


# ----------------------------------------------------------------------------------------
# 4. A trained adapter is never re-initialised
# ----------------------------------------------------------------------------------------
def logits_of(model, data: Dataset) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(data["input_ids"][:16])).logits


def test_a_new_trainer_keeps_a_trained_adapters_A(tmp_path):
    """Continuing a saved FedLoraConfig adapter leaves its logits unchanged until training moves them."""
    data = toy_dataset(200)
    first = FederatedTrainer(
        tiny_peft(FedLoraConfig), fed_args(tmp_path / "run1", learning_rate=0.1), train_dataset=data
    )
    first.train()
    first.save_model()

    config = FedLoraConfig.from_pretrained(str(tmp_path / "run1"))
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "run1"), config=config, is_trainable=True)
    before = logits_of(loaded, data)
    FederatedTrainer(loaded, fed_args(tmp_path / "run2"), train_dataset=data)
    torch.testing.assert_close(logits_of(loaded, data), before, rtol=0, atol=0)

    # The same in memory: a second trainer on the first one's model.
    before = logits_of(first.model, data)
    FederatedTrainer(first.model, fed_args(tmp_path / "run3"), train_dataset=data)
    torch.testing.assert_close(logits_of(first.model, data), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------
# 5. Continuing composes with what was spent
# ----------------------------------------------------------------------------------------
def independent_rdp_epsilon(history, delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [tuple(entry) for entry in history]
    return accountant.get_epsilon(delta)


def trained_dp_adapter(tmp_path, target: float) -> str:
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig), fed_args(tmp_path / "run1", dp_target_epsilon=target), train_dataset=toy_dataset(200)
    )
    trainer.train()
    trainer.save_model()
    return str(tmp_path / "run1")


def continued(path: str, tmp_path, **overrides) -> FederatedTrainer:
    config = FFALoraConfig.from_pretrained(path)
    model = PeftModel.from_pretrained(tiny_bert(), path, config=config, is_trainable=True)
    return FederatedTrainer(model, fed_args(tmp_path / "run2", **overrides), train_dataset=toy_dataset(200))


def test_continuing_a_recorded_adapter_composes_its_spent_privacy(tmp_path):
    path = trained_dp_adapter(tmp_path, target=2.0)
    first = json.loads(open(f"{path}/{FEDERATED_RECORD_NAME}").read())["privacy"]

    second = continued(path, tmp_path, dp_target_epsilon=3.0)
    second.train()
    report = second.privacy_report()
    for name, client in report["clients"].items():
        history = client["history"]
        assert history[: len(first["clients"][name]["history"])] == first["clients"][name]["history"]
        assert len(history) > len(first["clients"][name]["history"])  # this run's steps are on top
        independent = independent_rdp_epsilon(history, report["delta"])
        assert client["epsilon"] == pytest.approx(independent, rel=1e-9)
        assert first["clients"][name]["epsilon"] < independent <= 3.0
    second.save_model()
    card = (tmp_path / "run2" / CARD_NAME).read_text()
    assert "continued an earlier run" in card


def test_continuing_past_the_target_is_refused_before_training(tmp_path):
    """A target the earlier run already used up is refused, naming the knowing way out, and nothing trains."""
    path = trained_dp_adapter(tmp_path, target=2.0)
    second = continued(path, tmp_path, dp_target_epsilon=1.5)
    before = {k: v.clone() for k, v in second.global_state().items()}
    with pytest.raises(ValueError, match="dp_new_privacy_budget"):
        second.train()
    assert all(torch.equal(before[k], second.global_state()[k]) for k in before)


def test_a_trained_adapter_without_a_record_is_refused_under_dp(tmp_path):
    path = trained_dp_adapter(tmp_path, target=2.0)
    config = FFALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = PeftModel.from_pretrained(tiny_bert(), path, config=config, is_trainable=True)
    with pytest.raises(ValueError, match="no record") as error:
        FederatedTrainer(model, fed_args(tmp_path / "x", dp_target_epsilon=2.0), train_dataset=toy_dataset(200))
    assert "from_pretrained" in str(error.value) and "dp_new_privacy_budget" in str(error.value)


def test_a_new_privacy_budget_is_possible_on_request_and_said_on_the_card(tmp_path):
    path = trained_dp_adapter(tmp_path, target=2.0)
    second = continued(path, tmp_path, dp_target_epsilon=2.0, dp_new_privacy_budget=True)
    second.train()
    second.save_model()
    assert second.privacy_report()["epsilon"] <= 2.0
    assert "new** privacy budget" in (tmp_path / "run2" / CARD_NAME).read_text()
