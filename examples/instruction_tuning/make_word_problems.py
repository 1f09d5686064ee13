#!/usr/bin/env python
"""Write GSM8K-style word problems (question / answer ending in `#### n`) generated offline by reasoning-gym.

reasoning-gym (Apache-2.0, `pip install "hf-fedlora[instruct]"`) generates procedurally, so no download is
needed. `gsm_symbolic` re-instantiates GSM8K problems with new names and numbers; its answers carry GSM8K's own
step-by-step solution. `--answer_style final` keeps only `#### n` (short answers: cheap to train and generate
on a CPU); `cot` keeps the worked solution. Train and test use different seeds.

    python make_word_problems.py --out_dir data/gsm_symbolic --num_train 600 --num_test 60 --answer_style final
"""

from __future__ import annotations

import argparse
import json
import os


def problems(task: str, size: int, seed: int, answer_style: str) -> list[dict[str, str]]:
    import reasoning_gym

    rows = []
    for entry in reasoning_gym.create_dataset(task, size=size, seed=seed):
        solution = (entry.get("metadata") or {}).get("answer_cot")
        if answer_style == "cot" and solution:
            answer = solution if "####" in solution else f"{solution}\n#### {entry['answer']}"
        else:
            answer = f"#### {entry['answer']}"
        rows.append({"question": entry["question"].strip(), "answer": answer})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--task", default="gsm_symbolic", help="A reasoning-gym dataset with numeric answers.")
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_test", type=int, default=60)
    parser.add_argument("--answer_style", choices=("final", "cot"), default="final")
    parser.add_argument("--seed", type=int, default=0, help="Train seed; the test set uses seed + 1.")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    train = problems(args.task, args.num_train, args.seed, args.answer_style)
    seen = {row["question"] for row in train}  # a test question that is also a training question is dropped
    test = list(problems(args.task, 2 * args.num_test, args.seed + 1, args.answer_style))
    test = [row for row in test if row["question"] not in seen][: args.num_test]
    for split, rows in (("train", train), ("test", test)):
        path = os.path.join(args.out_dir, f"{split}.jsonl")
        with open(path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} {args.task} problems to {path}")


if __name__ == "__main__":
    main()
