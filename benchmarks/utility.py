"""Test accuracy and macro-F1 of every federated method at several privacy budgets, with a centralised ceiling.

Setting: all-MiniLM-L6-v2 (r=8 on query/value of layers 3-5 by default, a trainable classifier head on the masked mean
over tokens: `--pooling mean`, hf_fedlora.models.BertMeanPoolingForSequenceClassification; `--pooling pooler` for
BertForSequenceClassification) on the offline tweets (3 classes), split among clients by a Dirichlet label skew;
every client takes part in every round. Each method runs with the recipe's settings
(hf_fedlora.comparison.RECIPE_METHOD_SETTINGS: FFA-LoRA's lora_B at 0.1x the head's rate) unless
`--config_defaults`.
Each method in `hf_fedlora.methods.CONFIG_CLASSES` runs at each target epsilon (per client, unit one
example, delta 1e-5) and non-private, over several seeds; the seed drives the partition, the client
sampling streams, the classifier head's init and the shared init of A (`init_seed`). DP noise is drawn
from fresh OS entropy (`dp_secret_seed=None`), as a real run would.

Why the same example budget: methods are compared at equal compute and equal privacy cost, so every
run processes rounds x local steps x batch size x clients examples (in expectation under Poisson
sampling; the count actually processed is recorded). A method with several sub-rounds per round
(DEeR: B then A) splits the local steps among them (`--sub_round_steps split`), so it does the same
work and its clients take the same number of noisy steps. The centralised ceiling is plain
`transformers.Trainer` + `peft.LoraConfig`, non-private, with the same number of examples
(rounds x local steps x clients steps at the same batch size), the same optimizer and schedule
(`--optim`, `--lr_scheduler_type`: AdamW at a constant rate by default) and gradient-norm clipping 1.0.

Every finished run is written at once to benchmarks/results/utility.json (`--resume` skips the
(method, epsilon, seed) cells already there with the same settings), then the aggregated table
goes to the terminal, to utility.md and to utility_accuracy_vs_epsilon.png (needs matplotlib).

    .venv/bin/python benchmarks/utility.py                 # the full grid (long: see the estimate it prints)
    .venv/bin/python benchmarks/utility.py --resume        # continue an interrupted run
    .venv/bin/python benchmarks/utility.py --quick         # smoke run, results under utility_quick.*
"""

from __future__ import annotations

from common import RESULTS_DIR, format_table, quiet, write_results

# isort: split

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
from hf_fedlora.comparison import DEFAULT_LEARNING_RATES, local_steps_per_sub_round, recipe_settings
from hf_fedlora.demo_task import (
    MINILM_RECIPE_LAYERS,
    compute_classification_metrics,
    load_tweet_task,
    minilm_classifier,
)
from hf_fedlora.methods import CONFIG_CLASSES

CEILING = "centralised"  # the pseudo-method name of the centralised non-private LoRA ceiling
METHODS = {config_cls.method_class.name: config_cls for config_cls in CONFIG_CLASSES}
# Learning rates (AdamW defaults otherwise): the package's one table (hf_fedlora.comparison, which says where
# each rate came from), shared with `hf-fedlora demo`; the centralised ceiling uses LoRA's. Methods without an
# entry use LoRA's.
DEFAULT_LRS = {name: rate.value for name, rate in DEFAULT_LEARNING_RATES.items()}
DEFAULT_LRS[CEILING] = DEFAULT_LRS["lora"]
FALLBACK_LR_OF = "lora"
# Smoke run: every code path (each method, DP and not, the ceiling) on a few steps; 2 clients keep the
# per-client noise calibration (seconds per client with PRV) short.
QUICK = dict(
    rounds=1, local_steps=2, batch_size=8, clients=2, seeds=[0], epsilons=[8.0, None], max_eval=64, max_train=1000
)


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def parse_layers(text: str) -> int | None:
    """A MiniLM layer index, or None for 'all' (LoRA on every layer)."""
    return None if text.lower() == "all" else int(text)


def parse_epsilon(text: str) -> float | None:
    """A target epsilon, or None for a non-private run ("none", "inf", "nonprivate")."""
    if text.lower() in ("none", "inf", "nonprivate", "non-private"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0, got {text}")
    return value


def parse_lr(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"--lr takes METHOD=RATE, got {text!r}")
    return name, float(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="Communication rounds.")
    parser.add_argument("--local_steps", type=int, default=4, help="Local steps per client per round.")
    parser.add_argument(
        "--batch_size", type=int, default=96, help="Logical (expected, under DP) batch of one optimizer step."
    )
    parser.add_argument(
        "--physical_batch_size",
        type=int,
        default=None,
        help="Micro-batch that fits in memory (default: 16, or the logical batch when smaller); divides --batch_size.",
    )
    parser.add_argument("--clients", type=int, default=8, help="Clients; all take part in every round.")
    parser.add_argument("--dirichlet_alpha", type=float, default=0.5, help="Label skew of the partition.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epsilons", type=parse_epsilon, nargs="+", default=[1.0, 3.0, 8.0, None], help="'none' = non-private."
    )
    parser.add_argument(
        "--methods", nargs="+", default=[*METHODS, CEILING], choices=[*METHODS, CEILING], help="Methods to run."
    )
    parser.add_argument(
        "--lr",
        type=parse_lr,
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help=f"Learning rate of a method (repeatable). Defaults: {DEFAULT_LRS}; others use {FALLBACK_LR_OF}'s.",
    )
    parser.add_argument("--max_eval", type=int, default=1000, help="Fixed test tweets the runs are scored on.")
    parser.add_argument("--max_train", type=int, default=None, help="Subsample the training tweets (default all).")
    parser.add_argument("--data_seed", type=int, default=0, help="Seed of the train/test split (fixed across runs).")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--clip_norm", type=float, default=1.0, help="Per-example clipping norm under DP.")
    parser.add_argument(
        "--clipping", default="flat", choices=["flat", "per_layer"], help="FederatedTrainingArguments.dp_clipping."
    )
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument(
        "--lora_layers",
        type=parse_layers,
        nargs="+",
        default=list(MINILM_RECIPE_LAYERS),
        help=f"MiniLM layers with LoRA (PEFT's layers_to_transform; 'all' for every layer). Default: the recipe's "
        f"{list(MINILM_RECIPE_LAYERS)}.",
    )
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument(
        "--pooling",
        default="mean",
        choices=["mean", "pooler"],
        help="What the head reads: the masked mean over tokens (the recipe) or BERT's pooler "
        "(BertForSequenceClassification).",
    )
    parser.add_argument(
        "--config_defaults",
        action="store_true",
        help="Every method at its config's defaults (FFA-LoRA's lr_ratio_b 1), not the recipe's method settings "
        "(hf_fedlora.comparison.RECIPE_METHOD_SETTINGS).",
    )
    parser.add_argument(
        "--pooler",
        default="frozen",
        choices=["frozen", "lora", "full"],
        help="With --pooling pooler, BERT's pooler: frozen, LoRA on its dense layer, or trained in full.",
    )
    parser.add_argument("--max_length", type=int, default=48, help="Tokens per tweet.")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="MiniLM's dropout while training (the recipe: 0; its own: 0.1)."
    )
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim of every run.")
    parser.add_argument(
        "--adam_epsilon", type=float, default=1e-8, help="TrainingArguments.adam_epsilon (Adam's denominator floor)."
    )
    parser.add_argument(
        "--lr_scheduler_type",
        default="constant",
        help="TrainingArguments.lr_scheduler_type of every run (federated: over all rounds x local steps).",
    )
    parser.add_argument(
        "--sub_round_steps",
        choices=["split", "each"],
        default="split",
        help="Methods with k sub-rounds per round: split local_steps among them (same examples) or run each.",
    )
    parser.add_argument("--resume", action="store_true", help="Skip cells already in the results file.")
    parser.add_argument("--name", default=None, help="Results file name under benchmarks/results/ (default utility).")
    parser.add_argument("--quick", action="store_true", help=f"Smoke run {QUICK}; writes utility_quick.*")
    args = parser.parse_args(argv)
    if args.quick:  # the preset replaces the defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    args.name = args.name or ("utility_quick" if args.quick else "utility")
    if args.physical_batch_size is None:
        args.physical_batch_size = min(16, args.batch_size)  # fastest on 2 CPU cores (RESULTS.md#micro-batch)
    if args.batch_size % args.physical_batch_size:
        parser.error(f"--physical_batch_size {args.physical_batch_size} must divide --batch_size {args.batch_size}")
    if None in args.lora_layers:
        args.lora_layers = None  # 'all': PEFT's default, every layer
    args.learning_rates = {**DEFAULT_LRS, **dict(args.lr)}
    unknown = set(args.learning_rates) - {*METHODS, CEILING}
    if unknown:
        parser.error(f"--lr names unknown methods {sorted(unknown)}; known: {[*METHODS, CEILING]}")
    if args.pooler != "frozen" and args.pooling != "pooler":
        parser.error(f"--pooler {args.pooler} trains BERT's pooler, which --pooling {args.pooling} leaves out")
    return args


def learning_rate(args: argparse.Namespace, method: str) -> tuple[float, str]:
    """(rate, where it came from): a flag, the default table, or LoRA's rate for a method without one."""
    if method in dict(args.lr):
        return args.learning_rates[method], "flag"
    if method in DEFAULT_LRS:
        return DEFAULT_LRS[method], "default"
    return args.learning_rates[FALLBACK_LR_OF], f"fallback ({FALLBACK_LR_OF}'s)"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a cell's result depends on besides (method, epsilon, seed) and its learning rate."""
    keys = [
        "rounds", "local_steps", "batch_size", "clients", "dirichlet_alpha", "max_eval", "max_train", "data_seed",
        "delta", "clip_norm", "clipping", "accountant", "lora_r", "lora_alpha", "max_length", "sub_round_steps",
        "dropout", "optim", "lr_scheduler_type", "lora_layers", "pooler", "pooling", "config_defaults",
    ]  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    settings.update(model="all-MiniLM-L6-v2", target_modules=["query", "value"], partition="dirichlet")
    settings["examples_per_run"] = args.rounds * args.local_steps * args.batch_size * args.clients
    return settings


# ----------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------
class ForwardCounter:
    """Counts the examples the model's training forward passes saw.

    Counted at the model, not the collator: `transformers.Trainer`'s (accelerate's) dataloader
    collates one batch ahead, so a collator count overstates the ceiling's examples by a batch.
    """

    def __init__(self, model: torch.nn.Module):
        self.examples = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if module.training:
            ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
            self.examples += int(ids.shape[0])

    def remove(self) -> None:
        self._handle.remove()


def lora_targets(args) -> dict[str, Any]:
    """PEFT target arguments: query/value of `--lora_layers`, and BERT's pooler as `--pooler` says."""
    query_value = {"target_modules": ["query", "value"], "layers_to_transform": args.lora_layers}
    if args.pooler == "frozen":
        return query_value
    if args.pooler == "full":
        return {**query_value, "modules_to_save": ["pooler"]}
    layers = "|".join(str(i) for i in args.lora_layers) if args.lora_layers else r"\d+"
    return {"target_modules": rf".*\.layer\.({layers})\.attention\.self\.(query|value)|.*\.pooler\.dense"}


def run_federated(method: str, epsilon: float | None, seed: int, lr: float, task, args) -> dict[str, Any]:
    """One FederatedTrainer run of `method`; returns its test scores, the epsilon spent and what it processed."""
    tokenizer, train, test = task
    config_cls = METHODS[method]
    set_seed(seed)  # the fresh classifier head is drawn from torch's global RNG
    config = config_cls(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        **lora_targets(args),
        task_type="SEQ_CLS",
        init_seed=seed,
        **({} if args.config_defaults else recipe_settings(method)),
    )
    model = get_peft_model(minilm_classifier(args.dropout, args.pooling), config)
    method_object = config.build_method()
    sub_rounds = method_object.num_sub_rounds(0)
    split = args.sub_round_steps == "split"
    steps = local_steps_per_sub_round(method_object, args.rounds, args.local_steps, split=split)
    counter = ForwardCounter(model)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = FederatedTrainingArguments(
            output_dir=output_dir,
            seed=seed,
            num_rounds=args.rounds,
            num_clients=args.clients,
            local_steps=steps,
            partition="dirichlet",
            dirichlet_alpha=args.dirichlet_alpha,
            per_device_train_batch_size=args.physical_batch_size,
            gradient_accumulation_steps=args.batch_size // args.physical_batch_size,
            per_device_eval_batch_size=128,
            learning_rate=lr,
            optim=args.optim,
            adam_epsilon=args.adam_epsilon,
            lr_scheduler_type=args.lr_scheduler_type,
            dp_target_epsilon=epsilon,
            dp_target_delta=args.delta,
            dp_clip_norm=args.clip_norm,
            dp_clipping=args.clipping,
            dp_accountant=args.accountant,
            dp_secret_seed=None,
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            dataloader_pin_memory=False,
        )
        trainer = FederatedTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            processing_class=tokenizer,
            compute_metrics=compute_classification_metrics,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        output = trainer.train()
        counter.remove()
        scores = trainer.evaluate(eval_dataset=test)
    report = trainer.privacy_report()
    clients = report.get("clients", {})
    return {
        "accuracy": scores["eval_accuracy"],
        "macro_f1": scores["eval_macro_f1"],
        "eval_loss": scores["eval_loss"],
        "train_loss": output.metrics["train_loss"],
        "epsilon_spent": report.get("epsilon"),
        "delta": report.get("delta"),
        "accountant": report.get("accountant"),
        "privacy_unit": report.get("unit"),
        "noise_multipliers": {name: c["noise_multiplier"] for name, c in clients.items()},
        "client_epsilons": {name: c["epsilon"] for name, c in clients.items()},
        "client_steps": {name: c["steps"] for name, c in clients.items()},
        "client_sizes": {name: len(data) for name, data in trainer.client_datasets.items()},
        "sub_rounds_per_round": sub_rounds,
        "local_steps_per_sub_round": steps,
        "examples_planned": args.rounds * sub_rounds * steps * args.batch_size * args.clients,
        "examples_processed": counter.examples,
    }


def run_centralised(seed: int, lr: float, task, args) -> dict[str, Any]:
    """The ceiling: one non-private LoRA on all the training tweets, same examples, batch and optimizer."""
    tokenizer, train, test = task
    set_seed(seed)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, **lora_targets(args), task_type="SEQ_CLS")
    model = get_peft_model(minilm_classifier(args.dropout, args.pooling), config)
    steps = args.rounds * args.local_steps * args.clients
    counter = ForwardCounter(model)
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            seed=seed,
            max_steps=steps,
            per_device_train_batch_size=args.physical_batch_size,
            gradient_accumulation_steps=args.batch_size // args.physical_batch_size,
            per_device_eval_batch_size=128,
            learning_rate=lr,
            optim=args.optim,
            lr_scheduler_type=args.lr_scheduler_type,  # over the same number of steps as the federated runs
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train,
            processing_class=tokenizer,
            compute_metrics=compute_classification_metrics,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        output = trainer.train()
        counter.remove()
        scores = trainer.evaluate(eval_dataset=test)
    return {
        "accuracy": scores["eval_accuracy"],
        "macro_f1": scores["eval_macro_f1"],
        "eval_loss": scores["eval_loss"],
        "train_loss": output.training_loss,
        "epsilon_spent": None,
        "accountant": None,
        "examples_planned": steps * args.batch_size,
        "examples_processed": counter.examples,
    }


# ----------------------------------------------------------------------------------------
# Results: incremental file, aggregation, tables
# ----------------------------------------------------------------------------------------
def cell_key(run: dict[str, Any]) -> tuple:
    return run["method"], run["epsilon"], run["seed"]


def load_finished(args: argparse.Namespace, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs from an earlier invocation that can be reused: same settings, same learning rate, no error."""
    path = RESULTS_DIR / f"{args.name}.json"
    if not args.resume or not path.exists():
        return []
    previous = json.loads(path.read_text())
    if previous.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(
            f"--resume: {path} was written with other settings ({previous.get('settings')}); "
            "move it away or rerun with the same flags"
        )
    kept = [
        run
        for run in previous.get("runs", [])
        if "error" not in run and run["learning_rate"] == learning_rate(args, run["method"])[0]
    ]
    print(f"resuming: {len(kept)} finished runs kept from {path}")
    return kept


def epsilon_label(epsilon: float | None) -> str:
    return "non-private" if epsilon is None else f"{epsilon:g}"


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, epsilon): mean, std (sample, over seeds), min and max of the test scores."""
    order = {name: i for i, name in enumerate([*METHODS, CEILING])}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if "error" not in run:
            groups.setdefault((run["method"], run["epsilon"]), []).append(run)
    rows = []
    for (method, epsilon), members in sorted(
        groups.items(), key=lambda item: (order.get(item[0][0], 99), math.inf if item[0][1] is None else item[0][1])
    ):
        spent = [r["epsilon_spent"] for r in members if r["epsilon_spent"] is not None]
        rows.append(
            {
                "method": method,
                "epsilon": epsilon,
                "learning_rate": members[0]["learning_rate"],
                "lr_source": members[0]["lr_source"],
                "seeds": sorted(r["seed"] for r in members),
                "accuracy": spread([r["accuracy"] for r in members]),
                "macro_f1": spread([r["macro_f1"] for r in members]),
                "epsilon_spent_max": max(spent) if spent else None,
                "accountant": members[0].get("accountant"),
                "examples_processed_mean": statistics.fmean(r["examples_processed"] for r in members),
                "seconds_mean": statistics.fmean(r["seconds"] for r in members),
            }
        )
    return rows


def score_text(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} [{stats['min']:.4f}, {stats['max']:.4f}]"


def table_rows(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["method", "target eps", "lr", "seeds", "accuracy mean ± std [min, max]"]
    headers += ["macro-F1 mean ± std [min, max]", "eps spent (max)", "accountant", "examples", "s/run"]
    rows = [
        [
            "centralised LoRA (ceiling)" if row["method"] == CEILING else row["method"],
            epsilon_label(row["epsilon"]),
            f"{row['learning_rate']:g}" + ("*" if row["lr_source"].startswith("fallback") else ""),
            len(row["seeds"]),
            score_text(row["accuracy"]),
            score_text(row["macro_f1"]),
            "" if row["epsilon_spent_max"] is None else f"{row['epsilon_spent_max']:.3f}",
            (row["accountant"] or "").upper(),
            f"{row['examples_processed_mean']:.0f}",
            f"{row['seconds_mean']:.0f}",
        ]
        for row in summary
    ]
    return headers, rows


def notes(args: argparse.Namespace, settings: dict[str, Any]) -> list[str]:
    rates = ", ".join(f"{m}={learning_rate(args, m)[0]:g} ({learning_rate(args, m)[1]})" for m in args.methods)
    if any(learning_rate(args, m)[1].startswith("fallback") for m in args.methods):
        rates += f"; lr marked * had no rate of its own and used {FALLBACK_LR_OF}'s: tune it with --lr"
    return [
        f"MiniLM (all-MiniLM-L6-v2), LoRA r={args.lora_r} alpha={args.lora_alpha} on query/value of layers "
        f"{'all' if args.lora_layers is None else args.lora_layers} + classifier head; "
        f"{args.clients} clients, Dirichlet alpha={args.dirichlet_alpha}, all clients every round.",
        f"Budget per run: {args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size} x "
        f"{args.clients} clients = {settings['examples_per_run']} examples (expected, Poisson under DP); "
        f"multi-sub-round methods: local steps {args.sub_round_steps} across sub-rounds.",
        f"Learning rates ({args.optim}, {args.lr_scheduler_type} schedule, grad-norm clip 1.0 when non-private): "
        f"{rates}.",
        f"DP: per-client target epsilon, delta={args.delta:g}, unit one example, clip norm {args.clip_norm}, "
        f"noise calibrated per client, accountant {args.accountant.upper()}; eps spent = largest over clients "
        "and, here, over seeds.",
        f"Test: the same {args.max_eval} test tweets for every run (split seed {args.data_seed}); std is the sample "
        "std over seeds; seeds drive partition, sampling, head init and the shared A init; DP noise from OS entropy.",
    ]


def write_markdown(args, settings, summary) -> str:
    headers, rows = table_rows(summary)
    lines = [f"# Utility: {args.name}", ""]
    lines += [f"- {note}" for note in notes(args, settings)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    path = RESULTS_DIR / f"{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    logging.getLogger("hf_fedlora").setLevel(logging.ERROR)  # per-run "non-private run" warnings are expected
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT vs transformers 5
    settings = settings_of(args)
    runs = load_finished(args, settings)
    done = {cell_key(run) for run in runs}
    cells = [
        (method, epsilon, seed)
        for seed in args.seeds
        for method in args.methods
        for epsilon in ([None] if method == CEILING else args.epsilons)
    ]
    todo = [cell for cell in cells if cell not in done]
    print(f"{len(cells)} cells, {len(todo)} to run; {settings['examples_per_run']} examples per run")

    if todo:
        task = load_tweet_task(
            args.data_seed,
            max_length=args.max_length,
            max_train_examples=args.max_train,
            max_eval_examples=args.max_eval,
        )
        print(f"{len(task[1])} training tweets, {len(task[2])} test tweets")

    started = time.perf_counter()
    for index, (method, epsilon, seed) in enumerate(todo, 1):
        lr, source = learning_rate(args, method)
        run: dict[str, Any] = {"method": method, "epsilon": epsilon, "seed": seed, "learning_rate": lr}
        run["lr_source"] = source
        run_started = time.perf_counter()
        try:
            if method == CEILING:
                run.update(run_centralised(seed, lr, task, args))
            else:
                run.update(run_federated(method, epsilon, seed, lr, task, args))
        except Exception as error:  # one failed cell (e.g. an empty Dirichlet client) is recorded; the grid goes on
            run["error"] = f"{type(error).__name__}: {error}"
        run["seconds"] = time.perf_counter() - run_started
        runs = [r for r in runs if cell_key(r) != cell_key(run)] + [run]
        write_results(args.name, {"settings": settings, "learning_rates": args.learning_rates, "runs": runs})
        elapsed = time.perf_counter() - started
        left = elapsed / index * (len(todo) - index)
        if "error" in run:
            outcome = f"FAILED {run['error']}"
        else:
            spent = "" if run["epsilon_spent"] is None else f"  eps spent {run['epsilon_spent']:.3f}"
            outcome = f"accuracy {run['accuracy']:.4f}  macro-F1 {run['macro_f1']:.4f}{spent}"
        print(
            f"[{index}/{len(todo)}] {method:<12} eps {epsilon_label(epsilon):<11} seed {seed}  {outcome}"
            f"  ({run['seconds']:.0f} s; about {left / 60:.0f} min left)",
            flush=True,
        )

    summary = summarise(runs)
    headers, rows = table_rows(summary)
    print()
    print(format_table(headers, rows))
    for note in notes(args, settings):
        print(f"- {note}")
    path = write_results(
        args.name, {"settings": settings, "learning_rates": args.learning_rates, "runs": runs, "summary": summary}
    )
    print(f"\nwrote {path}\nwrote {write_markdown(args, settings, summary)}")
    failed = [run for run in runs if "error" in run]
    if failed:
        print(f"{len(failed)} runs failed (see 'error' in the json); rerun with --resume to retry them")
    try:
        from plot_utility import plot_summary
    except ImportError as error:
        print(f"no plot: {error} (add matplotlib to the venv, then run benchmarks/plot_utility.py)")
    else:
        print(f"wrote {plot_summary(summary, args.name, settings)}")


if __name__ == "__main__":
    main()
