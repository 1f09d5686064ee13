"""Bad input is refused with a ValueError that names the field, before any training happens."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from tiny import fed_args, tiny_bert, tiny_peft, toy_dataset
from torch import nn

from hf_fedlora import FederatedTrainer, FFALoraConfig


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_nothing_trained(trainer: FederatedTrainer, before: dict[str, torch.Tensor]) -> None:
    """No parameter moved, no round ran and no client's accountant recorded a step."""
    assert all(torch.equal(before[name], p) for name, p in trainer.model.named_parameters())
    assert trainer.state.global_step == 0
    assert all(not client.history for client in trainer.privacy.clients.values())


# ----------------------------------------------------------------------------------------
# Arguments: refused when FederatedTrainingArguments is built
# ----------------------------------------------------------------------------------------
BAD_ARGUMENTS = [
    (dict(num_clients=2, clients_per_round=3), ["clients_per_round", "num_clients"]),
    (dict(dp_target_epsilon=0.0), ["dp_target_epsilon"]),
    (dict(dp_target_epsilon=-1.0), ["dp_target_epsilon"]),
    (dict(dp_target_delta=0.0), ["dp_target_delta"]),
    (dict(dp_target_delta=1.0), ["dp_target_delta"]),
    (dict(dp_target_delta=1.5), ["dp_target_delta"]),
    (dict(dp_target_epsilon=1.0, dp_noise_multiplier=1.0), ["dp_target_epsilon", "dp_noise_multiplier"]),
    (dict(dp_noise_multiplier=0.0), ["dp_noise_multiplier"]),
    (dict(dp_clip_norm=0.0), ["dp_clip_norm"]),
    (dict(local_steps=2, local_epochs=1.0), ["local_steps", "local_epochs"]),
    (dict(partition="by_magic"), ["partition", "by_magic"]),
    (dict(dp_accountant="gdp_typo"), ["dp_accountant", "gdp_typo"]),
    (dict(dp_noise_calibration="by_magic"), ["dp_noise_calibration", "by_magic"]),
    # Accepted before, and then broke the guarantee or hung the run:
    (dict(dp_clip_norm=float("inf")), ["dp_clip_norm", "finite"]),
    (dict(dp_target_epsilon=float("inf")), ["dp_target_epsilon", "finite"]),
    (dict(dp_noise_multiplier=float("inf")), ["dp_noise_multiplier", "finite"]),
    (dict(dp_clip_norm=float("nan")), ["dp_clip_norm", "finite"]),
    (dict(per_device_train_batch_size=0), ["per_device_train_batch_size", ">= 1"]),
    # Accepted before with a cryptic failure later:
    (dict(dp_target_epsilon="3"), ["dp_target_epsilon", "'3'"]),
    (dict(seed=-1), ["seed", ">= 0"]),
    (dict(dp_noise_multiplier=1.0, dp_secret_seed=-5), ["dp_secret_seed", ">= 0"]),
]


@pytest.mark.parametrize(
    ("overrides", "fields"),
    BAD_ARGUMENTS,
    ids=["-".join(f"{k}={v}" for k, v in overrides.items()) for overrides, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_are_refused_naming_the_field(tmp_path, overrides, fields):
    """Out-of-range, contradictory or unknown settings fail when the arguments are built, naming the field."""
    with pytest.raises(ValueError) as error:
        fed_args(tmp_path, **overrides)
    for field in fields:
        assert field in str(error.value)


def test_good_arguments_are_accepted(tmp_path):
    """The refusals above are specific: in-range values of the same fields are accepted."""
    args = fed_args(
        tmp_path,
        num_clients=3,
        clients_per_round=3,
        dp_target_epsilon=0.5,
        dp_target_delta=1e-6,
        dp_clip_norm=0.1,
        dp_accountant="prv",
        dp_noise_calibration="shared",
        partition="dirichlet",
    )
    assert args.private and args.clients_per_round == 3


# ----------------------------------------------------------------------------------------
# Clients and partitions: refused when the trainer is built
# ----------------------------------------------------------------------------------------
def test_more_clients_than_examples_is_refused(tmp_path):
    """num_clients=300 on 200 examples fails at construction, naming num_clients and the dataset size."""
    with pytest.raises(ValueError, match="num_clients") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, num_clients=300), train_dataset=toy_dataset(200))
    assert "300" in str(error.value) and "200" in str(error.value)


def test_ready_made_empty_client_is_refused(tmp_path):
    """A ready-made client with no examples fails at construction, naming that client."""
    clients = {"hospital_a": toy_dataset(20), "hospital_b": toy_dataset(20).select([])}
    with pytest.raises(ValueError, match="hospital_b") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, num_clients=None), train_dataset=clients)
    assert "hospital_a" not in str(error.value)


def test_label_proportions_row_that_yields_nothing_is_refused(tmp_path):
    """A label_proportions row too small to receive any example fails at construction, naming the field."""
    args = fed_args(
        tmp_path, num_clients=None, partition="label_proportions", label_proportions="[[1, 1], [0.001, 0.001]]"
    )
    with pytest.raises(ValueError, match="label_proportions") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=toy_dataset(200))
    assert "client_1" in str(error.value)


def test_more_clients_per_round_than_ready_made_clients_is_refused(tmp_path):
    """clients_per_round=3 with two ready-made clients fails at construction, naming clients_per_round."""
    args = fed_args(tmp_path, num_clients=None, clients_per_round=3)
    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=[toy_dataset(20), toy_dataset(20, seed=1)])


def test_dirichlet_partition_without_a_label_column_is_refused(tmp_path):
    """partition='dirichlet' on data with no label column fails at construction, naming label_column."""
    unlabelled = toy_dataset(200).remove_columns("label")
    with pytest.raises(ValueError, match="label_column"):
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, partition="dirichlet"), train_dataset=unlabelled)


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------
def test_target_modules_that_match_nothing_are_refused():
    """An adapter whose target_modules match no module fails when it is built, naming target_modules."""
    with pytest.raises(ValueError, match="target_modules"):
        tiny_peft(FFALoraConfig, target_modules=["no_such_layer"])


def batchnorm_head_model():
    """Tiny BERT whose classifier head (trained and averaged as modules_to_save) holds a BatchNorm1d."""
    base = tiny_bert()
    base.classifier = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2))
    return get_peft_model(base, FFALoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


def test_trainable_module_opacus_cannot_handle_is_refused_under_dp(tmp_path):
    """A trainable BatchNorm (buffers, batch statistics) fails DP construction with the module named."""
    with pytest.raises(ValueError, match="BatchNorm1d") as error:
        FederatedTrainer(
            batchnorm_head_model(), fed_args(tmp_path, dp_target_epsilon=1.0), train_dataset=toy_dataset(200)
        )
    assert "DP" in str(error.value)
    # Without DP the same model is fine: the refusal is about per-example gradients.
    FederatedTrainer(batchnorm_head_model(), fed_args(tmp_path), train_dataset=toy_dataset(200))


def test_plain_peft_lora_model_is_refused(tmp_path):
    """A model built with peft's own LoraConfig is refused: the trainer needs an hf_fedlora config."""
    model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="FedLoraConfig"):
        FederatedTrainer(model, fed_args(tmp_path), train_dataset=toy_dataset(200))


def test_non_peft_model_is_refused(tmp_path):
    """A bare transformers model is refused with a pointer to get_peft_model."""
    with pytest.raises(ValueError, match="PeftModel") as error:
        FederatedTrainer(tiny_bert(), fed_args(tmp_path), train_dataset=toy_dataset(200))
    assert "get_peft_model" in str(error.value)


# ----------------------------------------------------------------------------------------
# DP plans that cannot hold: refused by train() before the first step
# ----------------------------------------------------------------------------------------
def test_batch_larger_than_a_clients_data_is_refused_under_dp(tmp_path):
    """Under DP a batch size above a client's size (sample rate > 1) is refused before any step, naming both."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_clients=None, per_device_train_batch_size=8, dp_noise_multiplier=1.0),
        train_dataset={"big": toy_dataset(100), "tiny": toy_dataset(6, seed=1)},
    )
    before = weights_of(trainer.model)
    with pytest.raises(ValueError, match="per_device_train_batch_size") as error:
        trainer.train()
    assert "'tiny'" in str(error.value) and "'big'" not in str(error.value)
    assert_nothing_trained(trainer, before)


@pytest.mark.parametrize("delta", [1 / 150, 1 / 100, 1 / 50, 0.5])
def test_delta_not_below_one_over_n_is_refused(tmp_path, delta):
    """A delta of 1/N or more for the federation's N = 200 examples is refused before any step, naming
    dp_target_delta: 1/150 is below each client's 1/100 but would let the run leak a whole record."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, dp_noise_multiplier=1.0, dp_target_delta=delta),
        train_dataset=toy_dataset(200),  # two clients of 100
    )
    before = weights_of(trainer.model)
    with pytest.raises(ValueError, match="dp_target_delta"):
        trainer.train()
    assert_nothing_trained(trainer, before)


def test_delta_not_far_below_one_over_n_is_warned_about(tmp_path, caplog):
    """A delta below 1/N but above 0.1/N trains (it is a valid guarantee) and warns that it is loose."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_rounds=1, local_steps=1, dp_noise_multiplier=1.0, dp_target_delta=0.5 / 200),
        train_dataset=toy_dataset(200),  # two clients of 100
    )
    with caplog.at_level(logging.WARNING, logger="hf_fedlora.privacy.engine"):
        trainer.train()
    assert "dp_target_delta=0.0025 is not far below 1/N for the federation's N=200 examples" in caplog.text


# ----------------------------------------------------------------------------------------
# Inputs that broke the guarantee or the run: refused when the trainer is built (issue 7, item 6)
# ----------------------------------------------------------------------------------------
def frozen_batchnorm_model():
    """Tiny BERT with a frozen BatchNorm inside the encoder: not trained, yet it mixes the batch in train mode."""
    base = tiny_bert()
    base.bert.pooler.dense = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16))
    return get_peft_model(base, FFALoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))


def test_frozen_batchnorm_is_refused_under_dp(tmp_path):
    model = frozen_batchnorm_model()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "pooler" in n)
    with pytest.raises(ValueError, match="BatchNorm1d") as error:
        FederatedTrainer(model, fed_args(tmp_path, dp_noise_multiplier=1.0), train_dataset=toy_dataset(200))
    assert "batch statistics" in str(error.value)
    FederatedTrainer(frozen_batchnorm_model(), fed_args(tmp_path), train_dataset=toy_dataset(200))  # fine without DP


def test_dataset_dict_is_refused_not_taken_as_two_clients(tmp_path):
    splits = toy_dataset(200).train_test_split(test_size=0.5, seed=0)
    with pytest.raises(ValueError, match="DatasetDict") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, num_clients=None), train_dataset=splits)
    assert "['train', 'test']" in str(error.value)


def test_dora_is_refused_naming_use_dora():
    with pytest.raises(ValueError, match="use_dora"):
        tiny_peft(FFALoraConfig, use_dora=True)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 2, 1], "labels from 0 to 2, but the model has num_labels=2"),
        ([0, 1, -1, 1], "labels from -1 to 1"),
        (["neg", "pos", "neg", "pos"], "class_encode_column"),
        ([0.0, 1.0, 1.0, 0.0], "integer class ids"),
    ],
    ids=["above-range", "negative", "strings", "floats"],
)
def test_labels_the_head_cannot_score_are_refused_before_training(tmp_path, labels, message):
    data = toy_dataset(200).remove_columns("label").add_column("label", labels * 50)
    with pytest.raises(ValueError, match="label") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path, dp_noise_multiplier=1.0), train_dataset=data)
    assert message in str(error.value)


def test_labels_out_of_range_in_the_eval_dataset_are_refused(tmp_path):
    bad_eval = toy_dataset(20).remove_columns("label").add_column("label", [3] * 20)
    with pytest.raises(ValueError, match="eval_dataset"):
        FederatedTrainer(
            tiny_peft(FFALoraConfig), fed_args(tmp_path), train_dataset=toy_dataset(200), eval_dataset=bad_eval
        )


def test_dataset_without_the_models_input_column_is_refused(tmp_path):
    text_only = Dataset.from_dict({"text": [f"a b {i}" for i in range(200)], "label": [0, 1] * 100})
    with pytest.raises(ValueError, match="'input_ids'") as error:
        FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(tmp_path), train_dataset=text_only)
    assert "tokenizer" in str(error.value)
