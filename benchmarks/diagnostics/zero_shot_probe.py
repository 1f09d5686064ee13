"""A diagnostic: can the head start from the label names instead of at random (no data, so no privacy cost)?

Scores, on the 500 validation tweets lr_sweep.py carves from the training split, the zero-shot rule "the label
whose name's frozen MiniLM feature is nearest (cosine) to the tweet's", for the pooler, [CLS] and token-mean
features, with the bare names and with "This tweet is <name>.". benchmarks/RESULTS.md#zero-shot-probe: near the
majority class with the pooler that BertForSequenceClassification's head reads, so the idea was not pursued.

    .venv/bin/python benchmarks/diagnostics/zero_shot_probe.py     # ~1 min
"""

from __future__ import annotations

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: common.py)

# isort: split

from common import format_table, quiet, write_results

# isort: split

import argparse

import numpy as np
import torch
from datasets import Dataset
from frozen_probe import features
from sklearn.metrics import f1_score
from transformers import AutoModel, DataCollatorWithPadding

from hf_fedlora.demo_task import load_tweet_task
from hf_fedlora.offline_assets import TWEET_SENTIMENT_LABELS, minilm_path

VALIDATION_SIZE, DATA_SEED = 500, 0  # lr_sweep.py's split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # no options: --help only
    quiet()
    tokenizer, train, _ = load_tweet_task(DATA_SEED, max_length=48, max_eval_examples=1)
    split = train.train_test_split(test_size=VALIDATION_SIZE, seed=DATA_SEED, stratify_by_column="label")
    validation = split["test"]
    model = AutoModel.from_pretrained(minilm_path()).eval()
    collator = DataCollatorWithPadding(tokenizer)
    tweets = features(model, collator, validation)
    labels = np.array(validation["label"])
    prompts = {
        "name": list(TWEET_SENTIMENT_LABELS),
        "sentence": [f"This tweet is {n}." for n in TWEET_SENTIMENT_LABELS],
    }
    rows = []
    for prompt, texts in prompts.items():
        names = features(model, collator, Dataset.from_dict(dict(tokenizer(texts))))
        for kind in ("pooler", "cls", "mean"):
            a = tweets[kind] / np.linalg.norm(tweets[kind], axis=1, keepdims=True)
            b = names[kind] / np.linalg.norm(names[kind], axis=1, keepdims=True)
            predicted = (a @ b.T).argmax(axis=1)
            rows.append(
                {
                    "prompt": prompt,
                    "features": kind,
                    "accuracy": float((predicted == labels).mean()),
                    "macro_f1": float(f1_score(labels, predicted, average="macro")),
                    "predicted_counts": np.bincount(predicted, minlength=len(texts)).tolist(),
                }
            )
    majority = float(np.bincount(labels).max() / len(labels))
    print(format_table(list(rows[0]), [list(row.values()) for row in rows]))
    print(f"majority class: {majority:.3f} of the validation tweets")
    write_results("zero_shot_probe", {"majority_class_share": majority, "rows": rows})


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
