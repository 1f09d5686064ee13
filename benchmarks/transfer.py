"""Does the DP recipe travel? examples/glue/run_glue.py with its defaults on text the project never tuned on.

For each dataset of `transfer_data.py` (movie-review sentence polarity, 2 classes; fortune-cookie topics, 4
classes) and each seed, the offline all-MiniLM-L6-v2 trains, at an equal example budget:
- `centralised`: plain transformers.Trainer + peft LoraConfig on all the training data, non-private, with the
  recipe's model (head on the mean over tokens, dropout off, LoRA r=8 on query/value of layers 3-5), LoRA's recipe
  rate and the federated runs' logical batch, for as many examples as one federated run processes;
- `federated`: run_glue.py with `--dp_recipe true` and nothing else chosen, 4 Dirichlet(0.5) clients, for each method
  non-private and at each target epsilon (per client, unit one example, delta 1e-5, PRV), DP noise from OS entropy.
Nothing is chosen on these datasets: every setting is the recipe's (chosen on validation tweets), so no validation
split is needed; the test split is scored once, after training. Reported: test accuracy and macro-F1 (mean and
sample std over seeds), the majority-class accuracy, the share of test predictions in the most-predicted class (1.0:
a collapse to one class), the epsilon spent and the wall time.

    .venv/bin/python benchmarks/transfer_data.py --output_dir runs/transfer_data   # once: fetch and split the data
    .venv/bin/python benchmarks/transfer.py --data_dir runs/transfer_data             # the grid (about an hour)
    .venv/bin/python benchmarks/transfer.py --data_dir runs/transfer_data --quick     # smoke run
"""

from __future__ import annotations

from common import RESULTS_DIR, format_table, quiet, write_results

# isort: split

import argparse
import contextlib
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from sklearn.metrics import f1_score
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from hf_fedlora.comparison import default_learning_rate
from hf_fedlora.models import load_sequence_classifier
from hf_fedlora.offline_assets import minilm_path
from hf_fedlora.recipe import RECIPE_DROPOUT, RECIPE_LOCAL_STEPS, RECIPE_POOLING, RECIPE_ROUNDS, recipe_lora_layers

ROOT = Path(__file__).resolve().parents[1]
CENTRALISED = "centralised"
MINILM_LAYERS = 6


def load_run_glue():
    spec = importlib.util.spec_from_file_location("run_glue", ROOT / "examples" / "glue" / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_glue"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, default=Path("runs/transfer_data"), help="transfer_data.py's output.")
    parser.add_argument("--datasets", nargs="+", default=["movie_sentences", "fortune_topics"])
    parser.add_argument("--methods", nargs="+", default=["ffa_lora", "lora"])
    parser.add_argument("--epsilons", nargs="+", default=["none", "3", "8"], help="'none': non-private.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--dirichlet_alpha", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max_seq_length", type=int, default=48)
    parser.add_argument("--no_centralised", action="store_true", help="Skip the centralised ceiling.")
    parser.add_argument("--name", default="transfer", help="Results: benchmarks/results/<name>.json and .md.")
    parser.add_argument("--resume", action="store_true", help="Skip the runs already in the results file.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 300 training examples, 1 round, seed 0.")
    args = parser.parse_args(argv)
    args.epsilons = [None if e.lower() in ("none", "non-private") else float(e) for e in args.epsilons]
    if args.quick:
        args.seeds, args.name = [0], args.name + "_quick"
    return args


def encode(data, tokenizer, label2id: dict[str, int], max_length: int):
    """Tokenized sentences with the model's label ids (a new column: datasets casts a returned column back to the
    input's type, and the files' labels are strings)."""

    def batch_encode(batch):
        encoded = tokenizer(batch["sentence"], truncation=True, max_length=max_length)
        encoded["label_id"] = [label2id[str(label)] for label in batch["label"]]
        return encoded

    data = data.map(batch_encode, batched=True, remove_columns=data.column_names)
    return data.rename_column("label_id", "label")


def test_split(dataset: str, args: argparse.Namespace, tokenizer, label2id: dict[str, int]):
    """The held-out test sentences, tokenized as run_glue tokenizes, labels as the trained model's ids."""
    test = load_dataset("csv", data_files=str(args.data_dir / dataset / "test.csv"), split="train")
    return encode(test, tokenizer, label2id, args.max_seq_length)


def scores(trainer: Trainer, test) -> dict[str, Any]:
    """Test accuracy, macro-F1 and the share of predictions in the most-predicted class."""
    output = trainer.predict(test)
    predicted = np.argmax(output.predictions, axis=-1)
    labels = output.label_ids
    return {
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "top_prediction_share": Counter(predicted.tolist()).most_common(1)[0][1] / len(predicted),
        "majority_accuracy": Counter(labels.tolist()).most_common(1)[0][1] / len(labels),
    }


def run_federated(run_glue, dataset: str, method: str, epsilon: float | None, seed: int, args) -> dict[str, Any]:
    """run_glue.main with the recipe's defaults; the test split scored once afterwards."""
    with tempfile.TemporaryDirectory() as output_dir:
        flags = [
            "--model_name_or_path", minilm_path(), "--train_file", str(args.data_dir / dataset / "train.csv"),
            "--output_dir", output_dir, "--method", method, "--seed", str(seed),
            "--num_clients", str(args.clients), "--partition", "dirichlet",
            "--dirichlet_alpha", str(args.dirichlet_alpha), "--max_seq_length", str(args.max_seq_length),
            "--dp_recipe", "true", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu",
            "--per_device_eval_batch_size", "128", "--dataloader_pin_memory", "false", "--save_strategy", "no",
        ]  # fmt: skip
        if args.quick:
            flags += ["--max_train_samples", "300", "--num_rounds", "1"]
        if epsilon is not None:
            flags += ["--dp_target_epsilon", str(epsilon), "--dp_target_delta", str(args.delta)]
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            trainer = run_glue.main(flags)
        train_seconds = time.perf_counter() - start
        test = test_split(dataset, args, trainer.processing_class, trainer.model.config.label2id)
        result = scores(trainer, test)
    report = trainer.privacy_report()
    sizes = {name: len(data) for name, data in trainer.client_datasets.items()}
    training = trainer.args
    return {
        **result,
        "epsilon_spent": report.get("epsilon"),
        "delta": report.get("delta"),
        "noise_multipliers": {n: c["noise_multiplier"] for n, c in report.get("clients", {}).items()},
        "client_sizes": sizes,
        "logical_batch": training.per_device_train_batch_size * training.gradient_accumulation_steps,
        "rounds": training.num_rounds,
        "local_steps": training.local_steps,
        "learning_rate": training.learning_rate,
        "examples_planned": len(sizes)
        * training.num_rounds
        * RECIPE_LOCAL_STEPS
        * training.per_device_train_batch_size
        * training.gradient_accumulation_steps,
        "recipe": [line for line in printed.getvalue().splitlines() if line.startswith("  - ")],
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }


def run_centralised(dataset: str, seed: int, logical_batch: int, args) -> dict[str, Any]:
    """Non-private LoRA on all the training data: the recipe's model, one federated run's examples."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train = load_dataset("csv", data_files=str(args.data_dir / dataset / "train.csv"), split="train")
    if args.quick:
        train = train.select(range(300))
    labels = sorted(set(train["label"]))
    label2id = {str(label): i for i, label in enumerate(labels)}

    train = encode(train, tokenizer, label2id, args.max_seq_length)
    set_seed(seed)
    model = load_sequence_classifier(
        minilm_path(), pooling=RECIPE_POOLING, dropout=RECIPE_DROPOUT, num_labels=len(labels),
        id2label={i: str(label) for i, label in enumerate(labels)}, label2id=label2id,
    )  # fmt: skip
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
        layers_to_transform=list(recipe_lora_layers(MINILM_LAYERS)),
    )  # fmt: skip
    model = get_peft_model(model, config)
    rounds = 1 if args.quick else RECIPE_ROUNDS
    steps = args.clients * rounds * RECIPE_LOCAL_STEPS
    micro = 16 if logical_batch % 16 == 0 else logical_batch
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, seed=seed, max_steps=steps, per_device_train_batch_size=micro,
            gradient_accumulation_steps=logical_batch // micro, per_device_eval_batch_size=128,
            learning_rate=default_learning_rate("lora").value, lr_scheduler_type="constant", report_to=[],
            disable_tqdm=True, use_cpu=True, save_strategy="no", logging_strategy="no", dataloader_pin_memory=False,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=training_args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer)
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        result = scores(trainer, test_split(dataset, args, tokenizer, label2id))
    return {
        **result,
        "epsilon_spent": None,
        "logical_batch": logical_batch,
        "learning_rate": training_args.learning_rate,
        "examples_planned": steps * logical_batch,
        "seconds": time.perf_counter() - start,
    }


def cell(run: dict[str, Any]) -> tuple:
    return run["dataset"], run["setting"], run["method"], run["epsilon"], run["seed"]


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(cell(run)[:4], []).append(run)
    rows = []
    for (dataset, setting, method, epsilon), members in groups.items():
        values = {key: [r[key] for r in members] for key in ("accuracy", "macro_f1", "top_prediction_share")}
        spent = [r["epsilon_spent"] for r in members if r.get("epsilon_spent") is not None]
        rows.append(
            {
                "dataset": dataset,
                "setting": setting,
                "method": method,
                "epsilon": epsilon,
                "seeds": len(members),
                **{f"{k}_mean": statistics.fmean(v) for k, v in values.items()},
                **{f"{k}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
                "majority_accuracy": members[0]["majority_accuracy"],
                "epsilon_spent_max": max(spent) if spent else None,
                "logical_batch": sorted({r["logical_batch"] for r in members}),
                "examples_planned_mean": statistics.fmean(r["examples_planned"] for r in members),
                "seconds_mean": statistics.fmean(r["seconds"] for r in members),
            }
        )
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets per dataset and method: DP at epsilon 8 within 90% of non-private federated accuracy, and
    never at the majority class where the non-private run is 5 or more points above it."""
    lines = []
    by = {(r["dataset"], r["setting"], r["method"], r["epsilon"]): r for r in rows}
    for (dataset, setting, method, epsilon), row in by.items():
        if setting != "federated" or epsilon is None:
            continue
        plain = by.get((dataset, "federated", method, None))
        if plain is None:
            continue
        ratio = row["accuracy_mean"] / plain["accuracy_mean"]
        margin = plain["accuracy_mean"] - row["majority_accuracy"]
        collapsed = row["accuracy_mean"] <= row["majority_accuracy"] + 0.005
        lines.append(
            f"{dataset}, {method}, epsilon {epsilon:g}: {ratio:.1%} of non-private federated accuracy "
            f"({row['accuracy_mean']:.3f} / {plain['accuracy_mean']:.3f})"
            + (" - meets 90%" if ratio >= 0.9 else " - BELOW 90%")
            + (f"; AT THE MAJORITY CLASS ({row['majority_accuracy']:.3f})" if collapsed and margin >= 0.05 else "")
        )
    return lines


def write_markdown(name: str, rows: list[dict[str, Any]], args) -> str:
    headers = ["dataset", "setting", "method", "epsilon", "seeds", "accuracy", "macro-F1", "majority acc.",
               "top-class share", "eps spent (max)", "logical batch", "examples", "s"]  # fmt: skip
    table = [
        [
            r["dataset"], r["setting"], r["method"], "non-private" if r["epsilon"] is None else f"{r['epsilon']:g}",
            r["seeds"], f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
            f"{r['macro_f1_mean']:.3f} ± {r['macro_f1_std']:.3f}", f"{r['majority_accuracy']:.3f}",
            f"{r['top_prediction_share_mean']:.2f}",
            "-" if r["epsilon_spent_max"] is None else f"{r['epsilon_spent_max']:.3f}",
            ",".join(str(b) for b in r["logical_batch"]), f"{r['examples_planned_mean']:.0f}",
            f"{r['seconds_mean']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    text = format_table(headers, table) + "\n\n" + "\n".join(f"- {line}" for line in verdicts(rows)) + "\n"
    (RESULTS_DIR / f"{name}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    run_glue = load_run_glue()
    path = RESULTS_DIR / f"{args.name}.json"
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if args.resume and path.exists() else []
    done = {cell(run) for run in runs}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    for seed in args.seeds:  # seed-major: an interrupted grid still covers every dataset
        for dataset in args.datasets:
            batches = []
            for method in args.methods:
                for epsilon in args.epsilons:
                    key = (dataset, "federated", method, epsilon, seed)
                    if key in done:
                        batches += [r["logical_batch"] for r in runs if cell(r) == key]
                        continue
                    result = run_federated(run_glue, dataset, method, epsilon, seed, args)
                    runs.append(
                        dict(zip(("dataset", "setting", "method", "epsilon", "seed"), key, strict=True)) | result
                    )
                    batches.append(result["logical_batch"])
                    print(
                        f"{dataset} seed {seed} {method} eps {epsilon}: acc {result['accuracy']:.3f} "
                        f"f1 {result['macro_f1']:.3f} top {result['top_prediction_share']:.2f} "
                        f"spent {result['epsilon_spent']} batch {result['logical_batch']} {result['seconds']:.0f}s",
                        flush=True,
                    )
                    write_results(args.name, {"settings": settings, "runs": runs})
            key = (dataset, CENTRALISED, "lora", None, seed)
            if not args.no_centralised and key not in done:
                result = run_centralised(dataset, seed, batches[0], args)  # the split's recipe batch
                runs.append(dict(zip(("dataset", "setting", "method", "epsilon", "seed"), key, strict=True)) | result)
                print(f"{dataset} seed {seed} centralised: acc {result['accuracy']:.3f} {result['seconds']:.0f}s")
                write_results(args.name, {"settings": settings, "runs": runs})
    rows = summarise(runs)
    write_results(args.name, {"settings": settings, "runs": runs, "summary": rows, "verdicts": verdicts(rows)})
    print(write_markdown(args.name, rows, args))


if __name__ == "__main__":
    main()
