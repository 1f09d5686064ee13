"""The DP recipe's choices from the clients' sizes, its refusals, and the pooled classifiers it builds."""

from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, fed_args, toy_dataset
from transformers import RobertaConfig, RobertaForSequenceClassification

from hf_fedlora.comparison import default_learning_rate
from hf_fedlora.models import (
    BertClsPoolingForSequenceClassification,
    RobertaClsPoolingForSequenceClassification,
    RobertaMeanPoolingForSequenceClassification,
    load_sequence_classifier,
    sequence_classifier_class,
)
from hf_fedlora.recipe import MIN_CLIENT_SIZE, RecipeError, apply_dp_recipe, dp_recipe


def test_large_clients_get_the_recipes_batch_and_schedule():
    recipe = dp_recipe({"a": 4000, "b": 900, "c": 2500}, "ffa_lora", num_hidden_layers=6)
    assert (recipe.per_device_train_batch_size, recipe.gradient_accumulation_steps) == (16, 6)
    assert recipe.logical_batch_size == 96 and (recipe.num_rounds, recipe.local_steps) == (6, 4)
    assert recipe.learning_rate == default_learning_rate("ffa_lora").value == 0.05
    assert recipe.method_settings == {"lr_ratio_b": 0.1} and recipe.lora_layers == (3, 4, 5)
    assert "b, 900 examples" in recipe.describe()  # the smallest client and its sample rate are said


def test_the_smallest_client_caps_the_batch_at_its_size():
    recipe = dp_recipe([1000, 70, 500], "lora", num_hidden_layers=12)
    assert recipe.logical_batch_size == 64  # 70, down to whole micro-batches of 16
    assert "capped at the smallest client's size (client_1, 70 examples: it samples at q = 0.91" in recipe.describe()
    assert recipe.lora_layers == tuple(range(6, 12)) and recipe.method_settings == {}
    small = dp_recipe([20, 41], "lora", micro_batch_size=8)
    assert (small.per_device_train_batch_size, small.gradient_accumulation_steps) == (8, 2)


def test_deer_splits_the_local_steps_among_its_two_sub_rounds():
    assert dp_recipe([5000, 5000], "deer").local_steps == 2


def test_clients_below_the_minimum_are_refused_with_the_client_and_the_fixes():
    with pytest.raises(RecipeError, match=r"client_1 holds 15 examples.*at least 16") as refused:
        dp_recipe([3000, 15, 3000], "ffa_lora")
    message = str(refused.value)
    assert "--num_clients 46" in message  # 6015 examples // (4 x 32)
    assert "--dirichlet_alpha" in message and "--partition_min_size 32" in message
    assert dp_recipe([3000, 16, 3000], "ffa_lora").logical_batch_size == 16
    with pytest.raises(RecipeError, match="at least one client"):
        dp_recipe([], "lora")
    with pytest.raises(RecipeError, match="counts of examples"):
        dp_recipe([10.5, 100], "lora")
    with pytest.raises(ValueError, match="Unknown federated method 'nope'"):
        dp_recipe([100, 100], "nope")


def test_apply_dp_recipe_splits_as_the_trainer_will_and_keeps_what_the_user_set(tmp_path):
    data = toy_dataset(400)
    args = fed_args(tmp_path, num_clients=2, partition="iid", dp_target_epsilon=3.0, num_rounds=2, learning_rate=0.3)
    recipe, applied = apply_dp_recipe(args, data, "lora", num_hidden_layers=2, keep=["num_rounds"])
    assert applied.num_rounds == 2
    assert applied.learning_rate == recipe.learning_rate == default_learning_rate("lora").value
    assert applied.partition_min_size == MIN_CLIENT_SIZE and applied.local_steps == 4
    assert applied.hyperparameter_selection.endswith("Set by hand, not by the recipe: the rounds.")
    assert (
        "rounds (6)" not in applied.hyperparameter_selection and "local steps (4)" in applied.hyperparameter_selection
    )
    from hf_fedlora.federation.clients import clients_from

    clients, _, _ = clients_from(data, applied)
    smallest = min(len(c) for c in clients.values())
    assert recipe.logical_batch_size == 16 * (min(96, smallest) // 16)
    _, plain = apply_dp_recipe(fed_args(tmp_path, num_clients=2, partition="iid"), data, "lora")  # no DP: a baseline
    assert plain.gradient_accumulation_steps == applied.gradient_accumulation_steps and not plain.private
    client_unit = fed_args(tmp_path, num_clients=2, dp_target_epsilon=3.0, dp_unit="client")
    with pytest.raises(RecipeError, match="dp_unit='client'"):
        apply_dp_recipe(client_unit, data, "lora")


def _tiny_roberta(folder):
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=1, num_labels=3,
    )  # fmt: skip
    RobertaForSequenceClassification(config).save_pretrained(folder)
    return RobertaForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_roberta_pooled_classifiers_load_the_encoder_and_score_each_example_on_its_own_tokens(tmp_path, pooling):
    reference = _tiny_roberta(tmp_path / "roberta")
    model = load_sequence_classifier(str(tmp_path / "roberta"), pooling=pooling, dropout=0.0).eval()
    expected = {"mean": RobertaMeanPoolingForSequenceClassification, "cls": RobertaClsPoolingForSequenceClassification}
    assert type(model) is expected[pooling] and model.config.hidden_dropout_prob == 0.0
    theirs = dict(reference.roberta.named_parameters())
    for name, parameter in model.roberta.named_parameters():
        torch.testing.assert_close(parameter, theirs[name], msg=name)
    short, long = [0, 5, 9, 2], [0, 7, 3, 22, 40, 41, 2]
    alone = model(input_ids=torch.tensor([short]), attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    padded = model(
        input_ids=torch.tensor([short + [1, 1, 1], long]), attention_mask=torch.tensor([[1] * 4 + [0] * 3, [1] * 7])
    ).logits
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)
    hidden = model.roberta(input_ids=torch.tensor([short])).last_hidden_state
    pooled = hidden.mean(dim=1) if pooling == "mean" else hidden[:, 0]
    torch.testing.assert_close(alone, model.classifier(pooled))


def test_the_pooling_choice_names_its_class_and_refuses_what_it_cannot_build():
    assert sequence_classifier_class("bert", "cls") is BertClsPoolingForSequenceClassification
    assert sequence_classifier_class("distilbert", "pooler").__name__ == "AutoModelForSequenceClassification"
    with pytest.raises(ValueError, match="'distilbert'.*use pooling 'pooler'"):
        sequence_classifier_class("distilbert", "mean")
    with pytest.raises(ValueError, match="pooling must be one of"):
        sequence_classifier_class("bert", "max")


def test_a_model_type_without_a_mean_pooled_class_keeps_its_own_head_and_the_recipe_says_so():
    assert dp_recipe([500, 500], "ffa_lora", model_type="roberta").pooling == "mean"
    recipe = dp_recipe([500, 500], "ffa_lora", model_type="distilbert")
    assert recipe.pooling == "pooler" and "head's input (pooler)" in recipe.selection_text()
    assert "no mean-pooling classifier for model type 'distilbert'" in recipe.describe()
