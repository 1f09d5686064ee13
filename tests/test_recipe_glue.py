"""run_glue under the DP recipe: the defaults train a mean-pooled head under DP, print and record every choice, and the
adapter reloads with plain peft onto the class the card names; flags override the recipe; clients too small for it
are refused before training with the fixes."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from peft import PeftModel
from test_examples import QUIET, WORDS, run_glue
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer

from hf_fedlora import FederatedTrainer
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME
from hf_fedlora.models import BertMeanPoolingForSequenceClassification
from hf_fedlora.recipe import RecipeError


@pytest.fixture(scope="module")
def sentences(tmp_path_factory):
    """A tiny BERT and 260 labelled sentences (130 per class) with 40 for validation."""
    root = tmp_path_factory.mktemp("recipe_assets")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(root / "bert")
    rng = np.random.default_rng(1)
    for name, n in (("train", 260), ("validation", 40)):
        rows = []
        for i in range(n):
            word = rng.choice(["good", "great"] if i % 2 else ["bad", "awful"])
            filler = " ".join(rng.choice(["the", "movie", "plot", "film", "was", "is"], size=rng.integers(3, 9)))
            label = ["negative", "positive"][i % 2]  # string labels, as users' files often have
            rows.append({"sentence": f"{filler} {word}", "label": label})  # distinct texts: even content-keyed split
        with open(root / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["sentence", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def _args(root, out, *extra):
    return [
        "--model_name_or_path", str(root / "bert"), "--output_dir", str(out),
        "--train_file", str(root / "train.csv"), "--validation_file", str(root / "validation.csv"),
        "--num_clients", "2", "--partition", "iid", "--lora_r", "4",
        "--dp_target_epsilon", "8", "--dp_target_delta", "1e-4", "--dp_accountant", "rdp", *QUIET, *extra,
    ]  # fmt: skip


def test_the_recipe_defaults_train_under_dp_and_the_adapter_reloads_onto_the_named_class(sentences, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = run_glue.main(_args(sentences, out))
    printed = capsys.readouterr().out
    args = trainer.args
    # about 100 examples per client: the recipe's logical batch of 96, in micro-batches of 16
    assert "hf_fedlora DP recipe:" in printed and "logical batch 96 (6 micro-batches of 16)" in printed
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 6)
    assert (args.num_rounds, args.local_steps, args.learning_rate) == (6, 4, 0.05)
    assert args.partition_min_size == 32 and args.lr_scheduler_type == "constant"
    assert trainer.model.config.id2label == {0: "negative", 1: "positive"}
    config = trainer.model.peft_config["default"]
    assert config.layers_to_transform == [2, 3] and config.lr_ratio_b == 0.1
    base = trainer.model.get_base_model()
    assert isinstance(base, BertMeanPoolingForSequenceClassification)
    assert base.config.hidden_dropout_prob == 0.0 and base.config.attention_probs_dropout_prob == 0.0
    report = trainer.privacy_report()
    assert report["unit"] == "example" and 0 < report["epsilon"] <= 8.0 + 1e-9
    assert trainer.federation.rounds_done == 6

    record = json.loads((out / FEDERATED_RECORD_NAME).read_text())
    assert record["base_model_class"].endswith("mean_pooling.BertMeanPoolingForSequenceClassification")
    card = (out / CARD_NAME).read_text()
    assert "hf_fedlora's DP recipe" in card and "logical batch (96)" in card and "LoRA layers ([2, 3])" in card

    # plain peft onto the class the card names: the trained model's logits
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "BertMeanPoolingForSequenceClassification" in code
    loaded = PeftModel.from_pretrained(
        BertMeanPoolingForSequenceClassification.from_pretrained(sentences / "bert", num_labels=2), out
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["the movie was good", "the plot was awful"], padding=True, return_tensors="pt")
    trainer.model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trainer.model(**batch).logits)


def test_flags_given_by_hand_override_the_recipe_and_the_card_says_which(sentences, tmp_path):
    out = tmp_path / "run"
    trainer = run_glue.main(
        _args(sentences, out, "--num_rounds", "1", "--learning_rate", "0.02", "--pooling", "cls", "--lora_layers", "0")
    )
    args = trainer.args
    assert (args.num_rounds, args.learning_rate, args.local_steps) == (1, 0.02, 4)
    assert type(trainer.model.get_base_model()).__name__ == "BertClsPoolingForSequenceClassification"
    assert trainer.model.peft_config["default"].layers_to_transform == [0]
    said = "Set by hand, not by the recipe: the rounds, learning rate, head's input, LoRA layers."
    assert args.hyperparameter_selection.endswith(said) and said in (out / CARD_NAME).read_text()
    assert "head's input (mean)" not in args.hyperparameter_selection and "LoRA layers ([" not in said


def test_clients_too_small_for_the_recipe_are_refused_with_fixes_before_training(sentences, tmp_path, monkeypatch):
    monkeypatch.setattr(FederatedTrainer, "train", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ValueError, match=r"partition_min_size=32 for 9 clients needs 288 examples"):
        run_glue.main(_args(sentences, tmp_path / "a", "--num_clients", "9"))
    with pytest.raises(
        RecipeError, match=r"holds \d+ examples.*at least 16.*Fixes: fewer clients \(e.g. --num_clients 2\)"
    ) as refused:
        run_glue.main(_args(sentences, tmp_path / "b", "--num_clients", "16", "--partition_min_size", "1"))
    assert "--dirichlet_alpha" in str(refused.value) and "--partition_min_size 32" in str(refused.value)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_without_dp_the_recipe_is_off_unless_asked_for_a_baseline(sentences, tmp_path):
    base = _args(sentences, tmp_path / "a", "--num_rounds", "1", "--local_steps", "1")
    plain = [a for a in base if a not in ("--dp_target_epsilon", "8")]
    trainer = run_glue.main(plain)
    assert type(trainer.model.get_base_model()).__name__ == "BertForSequenceClassification"
    assert trainer.args.hyperparameter_selection is None
    baseline = run_glue.main([*plain, "--dp_recipe", "true", "--output_dir", str(tmp_path / "b")])
    assert not baseline.args.private and baseline.args.num_rounds == 1
    assert baseline.args.gradient_accumulation_steps == 6
    assert type(baseline.model.get_base_model()) is BertMeanPoolingForSequenceClassification
