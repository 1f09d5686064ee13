"""What DP-SGD cannot train is refused before training, naming the parameters and the fix: LoRA on an embedding
layer (Opacus records no per-example gradient for it), biases made trainable by the adapter config, and any other
trainable parameter outside the federated adapter (no client would step, send or average it)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_bert, tiny_peft, toy_dataset

from hf_fedlora import FedLoraConfig, FFALoraConfig
from hf_fedlora.federation.adapter_state import adapter_parameters
from hf_fedlora.privacy import PerExampleGradients, check_dp_trainable, check_trainable_is_federated


@pytest.mark.parametrize("config_cls", [FedLoraConfig, FFALoraConfig])
def test_lora_on_embeddings_is_refused_under_dp_naming_the_module(config_cls):
    model = tiny_peft(config_cls, target_modules=["query", "value", "word_embeddings"])
    for name, parameter in model.named_parameters():
        if ".lora_embedding_A." in name:
            parameter.requires_grad_(False)  # FFA-LoRA's A is frozen: its B alone still has no per-example gradient
    with pytest.raises(ValueError, match=r"Remove the embedding module \(word_embeddings\) from target_modules"):
        check_dp_trainable(model)
    check_trainable_is_federated(model)  # fine without DP: the factors are adapter tensors


def test_why_embeddings_are_refused_opacus_records_no_per_example_gradient_for_them():
    model = tiny_peft(FedLoraConfig, target_modules=["query", "word_embeddings"]).train()
    adapter = adapter_parameters(model)
    hooks = PerExampleGradients(model)
    hooks.attach_for(frozenset(adapter))
    rows = toy_dataset(4)[:4]
    inputs = {key: torch.tensor(values) for key, values in rows.items()}
    inputs["labels"] = inputs.pop("label")
    (model(**inputs).loss * 4).backward()
    missing = sorted(name for name, p in adapter.items() if getattr(p, "grad_sample", None) is None)
    hooks.remove()
    assert missing and all(".lora_embedding_" in name for name in missing)
    assert all(adapter[name].grad is not None for name in missing)  # trained without DP, not with


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_biases_are_refused_with_bias_none(bias):
    """hf_fedlora's configs refuse such a bias up front (test_methods); the model check is the second line, for a
    model whose PEFT config came from elsewhere."""
    with pytest.raises(ValueError, match="bias"):
        FedLoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias=bias)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", bias=bias)
    model = get_peft_model(tiny_bert(), config)
    assert any(p.requires_grad and name.endswith(".bias") for name, p in model.named_parameters())
    for check in (check_trainable_is_federated, check_dp_trainable):
        with pytest.raises(ValueError, match=rf"bias='{bias}'.*Use bias='none'"):
            check(model)


def test_a_parameter_unfrozen_outside_the_adapter_is_named():
    model = tiny_peft(FedLoraConfig)
    model.base_model.model.bert.pooler.dense.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense\.weight.*modules_to_save"):
        check_dp_trainable(model)


@pytest.mark.parametrize("config_cls", [FedLoraConfig, FFALoraConfig])
def test_lora_on_linear_layers_with_a_head_passes(config_cls):
    model = tiny_peft(config_cls)
    check_trainable_is_federated(model)
    check_dp_trainable(model)
