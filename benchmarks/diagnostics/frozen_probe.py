"""How far frozen MiniLM features go on the tweets: a non-private, centralised logistic-regression probe.

Not a federated or private result. It answers a question the utility runs raise: federated DP LoRA at the
demo's budget ends near 0.63 test accuracy, and the batch-128 recipe without DP at 0.619. Is the frozen model's
representation the limit, or the training? The probe fits scikit-learn's logistic regression on three frozen
features of MiniLM (BERT's pooler output, which BertForSequenceClassification's head sees; the [CLS] state; the
mean over tokens, how all-MiniLM-L6-v2 was trained) for `--train_examples` training tweets, and scores it on the
demo's 1000 test tweets (the same selection: `load_tweet_task` with the demo's seed).

    .venv/bin/python benchmarks/diagnostics/frozen_probe.py   # ~2 min on 2 CPU cores; writes results/frozen_probe.json
"""

from __future__ import annotations

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: common.py)

# isort: split

from common import format_table, quiet, write_results

# isort: split

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from transformers import AutoModel, DataCollatorWithPadding

from hf_fedlora.cli import DemoArguments, DemoTrainingArguments
from hf_fedlora.demo_task import load_tweet_task
from hf_fedlora.offline_assets import minilm_path


def features(model, collator, dataset, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Pooler output, [CLS] state and masked token mean of every example (eval mode, no gradients)."""
    out: dict[str, list[torch.Tensor]] = {"pooler": [], "cls": [], "mean": []}
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        pairs = zip(rows["input_ids"], rows["attention_mask"], strict=True)
        batch = collator([{"input_ids": ids, "attention_mask": mask} for ids, mask in pairs])
        with torch.no_grad():
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden, mask = output.last_hidden_state, batch["attention_mask"].unsqueeze(-1).float()
        out["pooler"].append(output.pooler_output)
        out["cls"].append(hidden[:, 0])
        out["mean"].append((hidden * mask).sum(1) / mask.sum(1))
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_examples", type=int, default=8000, help="Training tweets the probe is fitted on.")
    parser.add_argument("--regularisation", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="Inverse C.")
    args = parser.parse_args(argv)
    quiet()
    demo, seed = DemoArguments(), DemoTrainingArguments().seed  # the demo's: the same test tweets as its table
    tokenizer, train, test = load_tweet_task(seed, max_length=demo.max_length, max_eval_examples=demo.max_eval_examples)
    train = train.shuffle(seed=0).select(range(min(args.train_examples, len(train))))
    model = AutoModel.from_pretrained(minilm_path()).eval()
    collator = DataCollatorWithPadding(tokenizer)
    train_x, test_x = features(model, collator, train), features(model, collator, test)
    train_y, test_y = np.array(train["label"]), np.array(test["label"])
    runs = []
    for name in train_x:
        for c in args.regularisation:
            probe = LogisticRegression(C=c, max_iter=2000).fit(train_x[name], train_y)
            predicted = probe.predict(test_x[name])
            runs.append({
                "features": name, "C": c, "accuracy": float((predicted == test_y).mean()),
                "macro_f1": float(f1_score(test_y, predicted, average="macro")),
            })  # fmt: skip
    print(format_table(["features", "C", "test accuracy", "test macro-F1"], [list(r.values()) for r in runs]))
    settings = {**vars(args), "seed": seed, "test_tweets": len(test), "train_tweets": len(train)}
    print(f"wrote {write_results('frozen_probe', {'settings': settings, 'runs': runs})}")


if __name__ == "__main__":
    main()
