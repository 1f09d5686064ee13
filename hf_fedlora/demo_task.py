"""The demo's task: the offline all-MiniLM-L6-v2 classifier, the offline tweets, their metrics, and the run-time
estimate of the demo's first screen.

`hf-fedlora demo` (hf_fedlora/cli.py) parses and prints; what it trains on and with is built here, so that the
benchmarks and the Flower example build the very same model and data without importing the command line.
Heavy libraries (transformers, the trainer) are imported inside the builders, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_LAYERS = 6
MINILM_RECIPE_LAYERS = (3, 4, 5)  # hf_fedlora.recipe.recipe_lora_layers(6): benchmarks/RESULTS.md#recipe


def load_tweet_task(
    seed: int, *, max_length: int = 48, max_train_examples: int | None = None, max_eval_examples: int = 1000
):
    """The offline tweets, tokenized for MiniLM: (tokenizer, train, test).

    `max_train_examples` subsamples the training tweets; the test tweets are a seeded selection of
    `max_eval_examples`, shortest first (evaluation batches pad to their own longest tweet; accuracy does not
    depend on the order). The same seed gives the same selection as the demo's table.
    """
    from transformers import AutoTokenizer

    from .offline_assets import load_tweet_sentiment, minilm_path

    tweets = load_tweet_sentiment(seed=seed, max_examples=None)
    train, test = tweets["train"], tweets["test"]
    if max_train_examples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_examples, len(train))))
    test = test.shuffle(seed=seed).select(range(min(max_eval_examples, len(test))))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"])
    test = test.map(tokenize, batched=True, remove_columns=["text"])
    test = test.select(np.argsort([len(ids) for ids in test["input_ids"]], kind="stable"))
    return tokenizer, train, test


def minilm_classifier(dropout: float | None = None, pooling: str = "mean"):
    """The offline all-MiniLM-L6-v2 with a fresh 3-way sentiment head; `dropout` overrides the checkpoint's 0.1.

    `pooling`: "mean" (the head reads the masked mean over tokens, as the checkpoint was trained) or "pooler"
    (BertForSequenceClassification, whose head reads BERT's pooler).
    """
    from .models import load_sequence_classifier
    from .offline_assets import TWEET_SENTIMENT_LABELS, minilm_path

    if pooling not in ("mean", "pooler"):
        raise ValueError(f"pooling must be one of ['mean', 'pooler'], got {pooling!r}")
    return load_sequence_classifier(
        minilm_path(),
        pooling=pooling,
        dropout=dropout,
        num_labels=len(TWEET_SENTIMENT_LABELS),
        id2label=dict(enumerate(TWEET_SENTIMENT_LABELS)),
        label2id={label: i for i, label in enumerate(TWEET_SENTIMENT_LABELS)},
    )


def compute_classification_metrics(prediction) -> dict[str, float]:
    """Accuracy and macro-F1 of a Trainer's `EvalPrediction` (the demo's and the utility benchmark's scores)."""
    from sklearn.metrics import f1_score

    predicted = np.argmax(prediction.predictions, axis=-1)
    return {
        "accuracy": float((predicted == prediction.label_ids).mean()),
        "macro_f1": float(f1_score(prediction.label_ids, predicted, average="macro")),
    }


def upload_counting_trainer() -> type:
    """FederatedTrainer that adds up the bytes each client releases (the public `local_round`'s return) in
    `uploaded_bytes`, and keeps each release's size in `upload_sizes` (no names: under client-level DP only an
    expected upload may be reported); a factory, so that importing this module does not import the trainer."""
    from .trainer import FederatedTrainer

    class UploadCountingTrainer(FederatedTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.uploaded_bytes = dict.fromkeys(self.client_datasets, 0)
            self.upload_sizes: list[int] = []

        def local_round(self, name, round_index, sub_round, steps):
            upload, losses = super().local_round(name, round_index, sub_round, steps)
            if upload is not None:
                size = sum(t.numel() * t.element_size() for t in upload.values())
                self.uploaded_bytes[name] += size
                self.upload_sizes.append(size)
            return upload, losses

    return UploadCountingTrainer


# ----------------------------------------------------------------------------------------
# The first screen's run-time estimate
# ----------------------------------------------------------------------------------------
# A rough cost model, fitted on the project's 2-core CPU machine (2 torch threads, otherwise idle) from one whole
# default `--compare` run: logical batch 96 in micro-batches of 16, LoRA on layers 3-5, dropout off, 8 clients,
# five methods, 206-241 s each, 1,099 s in all, its first evaluation x0.6 of the reference speed
# (benchmarks/HISTORY.md#compare-b96-pooler; results/demo_compare_b96_pooler.json holds each run's seconds).
# Training and evaluation were not timed apart: the split below is a fit, not two measurements, and it was not
# measured per method. The scale (this machine's first evaluation against the reference) varied from x0.6 to x0.9
# between runs on the same idle machine: the estimate's main error. Refit from the seconds in results.json.
SECONDS_PER_TRAIN_EXAMPLE = 0.0156  # one DP training example (forward, per-example backward, clipping, noise)
SECONDS_PER_EVAL_EXAMPLE = 0.009  # one evaluated tweet
SECONDS_PER_CALIBRATION = 2.0  # one client's noise calibration for a target epsilon (PRV)


def estimate_seconds(*, training_examples: float, evaluated_examples: int, calibrations: int) -> float:
    """Seconds on the reference machine for this many DP training examples, evaluated tweets and calibrations."""
    return (
        training_examples * SECONDS_PER_TRAIN_EXAMPLE
        + evaluated_examples * SECONDS_PER_EVAL_EXAMPLE
        + calibrations * SECONDS_PER_CALIBRATION
    )


def machine_speed(eval_seconds: float, eval_examples: int) -> float:
    """How much slower than the reference this machine is (> 1: slower), from the time of one evaluation."""
    return eval_seconds / max(eval_examples * SECONDS_PER_EVAL_EXAMPLE, 1e-9)
