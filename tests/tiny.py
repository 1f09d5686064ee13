"""Tiny models and data built from configs, so each test runs in milliseconds."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from hf_fedlora import FederatedTrainingArguments

VOCAB = 64
SEQ_LEN = 8


def tiny_bert(num_labels: int = 2, seed: int = 0, hidden_size: int = 16) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_peft(config_cls, seed: int = 0, num_labels: int = 2, **config_kwargs):
    """A tiny BERT with an hf_fedlora adapter on query/value and a trainable classifier head."""
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}
    kwargs.update(config_kwargs)
    return get_peft_model(tiny_bert(num_labels=num_labels, seed=seed), config_cls(**kwargs))


def toy_dataset(n: int = 200, seed: int = 0, num_labels: int = 2) -> Dataset:
    """A learnable toy task: the label is decided by the first token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=generator)
    labels = (ids[:, 0] * num_labels // VOCAB).clamp(max=num_labels - 1)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * SEQ_LEN] * n, "label": labels.tolist()}
    )


def fed_args(output_dir, **overrides) -> FederatedTrainingArguments:
    """Quiet CPU arguments for tests; overrides win."""
    kwargs = dict(
        output_dir=str(output_dir),
        num_rounds=2,
        num_clients=2,
        local_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        dp_accountant="rdp",  # fast calibration; the PRV default has its own tests
    )
    kwargs.update(overrides)
    return FederatedTrainingArguments(**kwargs)


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    """8x8 images in 2x2 patches, dropout off (Opacus records activations in train mode)."""
    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def tiny_swin(num_labels: int = 3) -> SwinForImageClassification:
    """16x16 images, 2x2 patches: 8x8 tokens in 4x4 windows (4 per image, the second block shifted), dropout off:
    the per-example hooks see one row per window."""
    config = SwinConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        embed_dim=8,
        depths=[2, 1],
        num_heads=[2, 2],
        window_size=4,
        mlp_ratio=2.0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        num_labels=num_labels,
    )
    return SwinForImageClassification(config)
