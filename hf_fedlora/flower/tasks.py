"""Ready-made task factories for the Flower apps (name one in the run config's `task`).

- `minilm_tweets`: the offline all-MiniLM-L6-v2 on the offline tweet sentiment data (examples/flower).
- `tiny_bert`: a 2-layer BERT built from a config on a learnable toy task: checks a deployment in seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from datasets import Dataset
from peft import get_peft_model

from ..federation.partition import partition_dataset
from ..methods import config_class_for
from .task import FlowerTask

TINY_VOCAB, TINY_SEQ_LEN = 64, 8


def _adapter_config(run_config: Mapping[str, Any], **defaults: Any):
    method = str(run_config.get("method", "ffa_lora"))
    kwargs = {
        "r": int(run_config.get("lora-r", defaults.pop("r", 4))),
        "lora_alpha": int(run_config.get("lora-alpha", defaults.pop("lora_alpha", 8))),
        "target_modules": ["query", "value"],
        "task_type": "SEQ_CLS",
        **defaults,
    }
    return config_class_for(method)(**kwargs)


def tiny_bert(run_config: Mapping[str, Any]) -> FlowerTask:
    """Tiny BERT (hidden 16, 2 layers) and `examples-per-client` toy examples per client (label = first token)."""
    from transformers import BertConfig, BertForSequenceClassification

    per_client = int(run_config.get("examples-per-client", 24))
    data_seed = int(run_config.get("data-seed", 0))

    def build_model():
        torch.manual_seed(int(run_config.get("model-seed", 0)))
        config = BertConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
        return get_peft_model(BertForSequenceClassification(config), _adapter_config(run_config))

    def load_client_data(partition_id: int, num_partitions: int) -> Dataset:
        generator = torch.Generator().manual_seed(data_seed * 1000 + partition_id)
        ids = torch.randint(1, TINY_VOCAB, (per_client, TINY_SEQ_LEN), generator=generator)
        labels = (ids[:, 0] * 2 // TINY_VOCAB).clamp(max=1)
        return Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": [[1] * TINY_SEQ_LEN] * per_client, "label": labels.tolist()}
        )

    return FlowerTask(build_model=build_model, load_client_data=load_client_data)


def minilm_tweets(run_config: Mapping[str, Any]) -> FlowerTask:
    """The offline MiniLM with a 3-way head on the mean over tokens (as the demo's, `hf_fedlora.models`) on the
    offline tweets, split IID over the SuperNodes.

    Every client loads the same `max-train-examples` tweets and keeps its own partition (as Flower's
    partitioners do); the server builds only the model.
    """
    from transformers import AutoTokenizer

    from ..demo_task import minilm_classifier
    from ..offline_assets import load_tweet_sentiment, minilm_path

    seed = int(run_config.get("seed", 42))
    max_length = int(run_config.get("max-length", 48))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def build_model():
        torch.manual_seed(seed)  # the fresh classifier head
        model = get_peft_model(minilm_classifier(), _adapter_config(run_config, r=8, lora_alpha=16))
        model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
        return model

    def load_client_data(partition_id: int, num_partitions: int) -> Dataset:
        tweets = load_tweet_sentiment(seed=seed, max_examples=int(run_config.get("max-train-examples", 4000)))
        clients = partition_dataset(tweets["train"], scheme="iid", num_clients=num_partitions, seed=seed)
        data = list(clients.values())[partition_id]
        return data.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )

    return FlowerTask(build_model=build_model, load_client_data=load_client_data, processing_class=tokenizer)
