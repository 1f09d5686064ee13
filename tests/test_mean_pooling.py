"""The mean-pooling classifier (the recipe's model) and FFA-LoRA's lr_ratio_b (the recipe's setting).

An example's pooled feature must depend on its own tokens only (DP-SGD clips each example's own gradient), a BERT
checkpoint must load into the class, and an adapter trained on it under DP must load with plain `peft` onto the
class the card names, predicting as the trained model did.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny import VOCAB, fed_args, tiny_bert, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.federation.adapter_state import HEAD, LORA_B, factor_of
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME
from hf_fedlora.models import BertMeanPoolingForSequenceClassification

LR = 0.1


def tiny_mean_pooling(tmp_path, seed: int = 0) -> BertMeanPoolingForSequenceClassification:
    """The tiny BERT checkpoint (saved by BertForSequenceClassification) loaded into the mean-pooling class."""
    folder = tmp_path / "base"
    if not folder.exists():
        tiny_bert(num_labels=3, seed=seed).save_pretrained(folder)
    torch.manual_seed(seed)
    return BertMeanPoolingForSequenceClassification.from_pretrained(folder)


def test_an_example_scores_the_same_alone_and_padded_beside_a_longer_one(tmp_path):
    model = tiny_mean_pooling(tmp_path).eval()
    short, long = [5, 9, 13], [7, 3, 22, 40, 41, 2]
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 3, dtype=torch.long)).logits
    batch = model(
        input_ids=torch.tensor([short + [0, 0, 0], long]),
        attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]),
    ).logits
    torch.testing.assert_close(batch[0], alone[0], rtol=1e-5, atol=1e-6)
    # the head reads the mean of the last hidden states over the example's own tokens
    hidden = model.bert(input_ids=torch.tensor([short])).last_hidden_state
    torch.testing.assert_close(alone, model.classifier(hidden.mean(dim=1)))


def test_a_bert_checkpoint_loads_with_every_weight_but_the_unused_pooler(tmp_path):
    model = tiny_mean_pooling(tmp_path)
    reference = tiny_bert(num_labels=3, seed=0)
    ours = dict(model.named_parameters())
    theirs = {name: p for name, p in reference.named_parameters() if not name.startswith("classifier.")}
    assert not any("pooler" in name for name in ours)
    assert set(theirs) - set(ours) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    for name, parameter in theirs.items():
        if "pooler" not in name:
            torch.testing.assert_close(ours[name], parameter, msg=name)
    assert model.classifier.out_features == 3


def test_the_classifier_takes_transformers_losses(tmp_path):
    model = tiny_mean_pooling(tmp_path).eval()
    ids = torch.randint(1, VOCAB, (4, 5))
    labels = torch.tensor([0, 2, 1, 1])
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    loss, logits = model(input_ids=ids, labels=labels, return_dict=False)
    torch.testing.assert_close((loss, logits), (out.loss, out.logits))


@pytest.mark.parametrize("ratio", [0.0, -1.0, math.nan, math.inf, "0.1", True])
def test_ffa_lora_refuses_a_learning_rate_ratio_that_is_not_positive_and_finite(ratio):
    with pytest.raises(ValueError, match="lr_ratio_b"):
        FFALoraConfig(r=4, target_modules=["query"], lr_ratio_b=ratio)


def test_ffa_lora_trains_b_at_lr_ratio_b_times_the_heads_rate(tmp_path):
    """Checked on the rates the trainer's optimizer runs at, every local step, under DP."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig, lr_ratio_b=0.1),
        fed_args(tmp_path, learning_rate=LR, num_clients=1, dp_noise_multiplier=1.0, dp_secret_seed=3),
        train_dataset=toy_dataset(64),
    )
    seen = []
    step = trainer._local_step

    def recording(data, indices, optimizer):
        inner = getattr(optimizer, "original_optimizer", optimizer)
        by_factor = {}
        for group in inner.param_groups:
            names = {factor_of(trainer._parameter_names[id(p)]) for p in group["params"]}
            for factor in names:
                by_factor.setdefault(factor, set()).add(round(group["lr"], 12))
        seen.append(by_factor)
        return step(data, indices, optimizer)

    trainer._parameter_names = {id(p): name for name, p in trainer.model.named_parameters()}
    trainer._local_step = recording
    trainer.train()
    assert len(seen) == 4
    for rates in seen:
        assert rates[LORA_B] == {round(0.1 * LR, 12)}
        assert rates[HEAD] == {round(LR, 12)}


def test_a_private_run_on_the_class_saves_an_adapter_plain_peft_loads_onto_it(tmp_path):
    """The record and the card name the class; the card's own loading code rebuilds the trained model."""
    base = tiny_mean_pooling(tmp_path)
    config = FFALoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", lr_ratio_b=0.1)
    model = get_peft_model(base, config)
    out = tmp_path / "run"
    data = toy_dataset(96, num_labels=3)
    trainer = FederatedTrainer(model, fed_args(out, dp_target_epsilon=4.0, dp_target_delta=1e-4), train_dataset=data)
    trainer.train()
    trainer.save_model(str(out))
    assert 0 < trainer.privacy_report()["epsilon"] <= 4.0

    record = json.loads((out / FEDERATED_RECORD_NAME).read_text())
    assert record["base_model_class"] == ("hf_fedlora.models.mean_pooling.BertMeanPoolingForSequenceClassification")
    assert record["method"]["lr_ratio_b"] == 0.1
    assert FFALoraConfig.from_pretrained(str(out)).lr_ratio_b == 0.1

    card = (out / CARD_NAME).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "from hf_fedlora.models.mean_pooling import BertMeanPoolingForSequenceClassification" in code
    assert "AutoModel" not in code
    namespace = {}
    exec(code.replace("<this adapter's repo id or local folder>", str(out)), namespace)  # the card's own code
    loaded = namespace["model"]
    assert isinstance(loaded, PeftModel)
    model.eval(), loaded.eval()
    ids = torch.tensor(data[:8]["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_flower_example_task_builds_the_mean_pooled_minilm():
    """examples/flower's task trains the same model as the demo, and the record the server writes names it."""
    from hf_fedlora.flower.tasks import minilm_tweets
    from hf_fedlora.hub import base_model_class

    model = minilm_tweets({"seed": 1}).build_model()
    assert isinstance(model.base_model.model, BertMeanPoolingForSequenceClassification)
    assert base_model_class(model) == "hf_fedlora.models.mean_pooling.BertMeanPoolingForSequenceClassification"
    assert model.peft_config["default"].base_model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
