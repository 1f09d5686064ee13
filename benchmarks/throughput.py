"""Training throughput: centralised LoRA vs. FederatedTrainer, non-private and under DP, side by side.

Every variant gets the same base weights, data, batch size and number of optimizer steps:

  (a) central   plain `transformers.Trainer` + `peft.LoraConfig`, non-private, `max_steps=N`
  (b) fed       `FederatedTrainer` (FedLoraConfig), non-private, C iid clients, rounds x C x local steps = N
  (c) dp-<m>    `FederatedTrainer` under DP for every method in `hf_fedlora.methods.CONFIG_CLASSES`, with a
                fixed noise multiplier so no calibration is timed

Only `trainer.train()` is timed (no loading, tokenising, evaluation or saving). Examples/s counts the
examples the model's training forward passes actually saw (Poisson batches vary in size). The variants run interleaved
(a, b, c1, c2, a, b, ...) and the table shows medians over the repetitions; the ratio to (a) is the
median of the per-repetition ratios, which cancels slow drifts of a shared machine. Targets (the issue):
(b) >= 0.95 and (c) >= 0.85 of (a). For DP runs the time spent computing epsilon (every round, for
every client) is estimated and shown separately. Run it alone on the machine: with other processes
busy, torch's default threads (one per core) spin-wait and a MiniLM step ran tens of times slower (`--threads 1`
helps when it can't be alone).

    .venv/bin/python benchmarks/throughput.py --model tiny
    .venv/bin/python benchmarks/throughput.py --model minilm
    .venv/bin/python benchmarks/throughput.py --model smollm2 --steps 16 --batch-size 8 --clients 2 \
        --local-steps 2 --methods ffa_lora lora --threads 2    # a causal LM: LoRA on its upper 8 layers
    .venv/bin/python benchmarks/throughput.py --quick          # smoke run: tiny model, a few steps
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# common comes first: it puts the Hugging Face libraries in offline mode before they are imported.
from common import (
    MODELS,
    ForwardCounter,
    Task,
    format_table,
    load_task,
    median,
    quiet,
    set_threads,
    silence_printer,
    timed,
    write_results,
)

# isort: split
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
from hf_fedlora.methods import CONFIG_CLASSES, FedLoraConfig

TARGETS = {"central": None, "fed": 0.95, "dp": 0.85}
TARGET_MODULES = ["query", "value"]


@dataclass(frozen=True)
class Setup:
    """What every variant shares."""

    steps: int
    batch_size: int
    clients: int
    local_steps: int
    lora_r: int
    lora_alpha: int
    learning_rate: float
    noise_multiplier: float
    accountant: str
    seed: int

    @property
    def rounds(self) -> int:
        return self.steps // (self.clients * self.local_steps)


@dataclass
class Variant:
    """One contender: a name, which target applies, and how to build its trainer."""

    name: str
    kind: str  # "central", "fed" or "dp": picks the target
    build: Callable[[Task, Setup, str], Trainer]


def lora_kwargs(setup: Setup, task: Task) -> dict[str, Any]:
    where = task.lora or {"target_modules": TARGET_MODULES, "task_type": "SEQ_CLS"}
    return {"r": setup.lora_r, "lora_alpha": setup.lora_alpha, **where}


def quiet_args(setup: Setup, output_dir: str) -> dict[str, Any]:
    """Arguments that keep evaluation, saving, logging and progress bars out of the timed loop."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": setup.batch_size,
        "learning_rate": setup.learning_rate,
        "seed": setup.seed,
        "report_to": [],
        "disable_tqdm": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "eval_strategy": "no",
        "use_cpu": True,
        "dataloader_pin_memory": False,
    }


def build_central(task: Task, setup: Setup, output_dir: str) -> Trainer:
    """(a): the baseline a user would write without hf_fedlora."""
    model = get_peft_model(task.fresh_model(), LoraConfig(**lora_kwargs(setup, task)))
    args = TrainingArguments(max_steps=setup.steps, **quiet_args(setup, output_dir))
    return Trainer(model=model, args=args, train_dataset=task.train, data_collator=task.collator)


def federated_builder(config_cls: type[FedLoraConfig], private: bool) -> Callable[..., Trainer]:
    def build(task: Task, setup: Setup, output_dir: str) -> Trainer:
        model = get_peft_model(task.fresh_model(), config_cls(**lora_kwargs(setup, task)))
        privacy = {"dp_noise_multiplier": setup.noise_multiplier, "dp_secret_seed": setup.seed} if private else {}
        args = FederatedTrainingArguments(
            num_rounds=setup.rounds,
            num_clients=setup.clients,
            local_steps=setup.local_steps,
            partition="iid",
            dp_accountant=setup.accountant,
            **privacy,
            **quiet_args(setup, output_dir),
        )
        return FederatedTrainer(model=model, args=args, train_dataset=task.train, data_collator=task.collator)

    return build


def variants(methods: list[str] | None = None) -> list[Variant]:
    """(a), (b), then (c) for every registered method (or those named), so methods added later are benchmarked
    too."""
    found = [
        Variant("central", "central", build_central),
        Variant("fed", "fed", federated_builder(FedLoraConfig, False)),
    ]
    for config_cls in CONFIG_CLASSES:
        if methods is not None and config_cls.method_class.name not in methods:
            continue
        found.append(Variant(f"dp-{config_cls.method_class.name}", "dp", federated_builder(config_cls, True)))
    return found


def run_once(variant: Variant, task: Task, setup: Setup) -> dict[str, Any]:
    """Build the trainer (untimed), time `train()`, and count what it processed."""
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = silence_printer(variant.build(task, setup, output_dir))
        counter = ForwardCounter(trainer.model)
        seconds, _ = timed(trainer.train)
        counter.remove()
    run = {
        "seconds": seconds,
        "examples": counter.examples,
        "batches": counter.batches,
        "examples_per_s": counter.examples / seconds,
    }
    if isinstance(trainer, FederatedTrainer):
        run["optimizer_steps"] = setup.rounds * setup.clients * setup.local_steps
        if trainer.privacy.enabled:
            # Each round logs the max epsilon over clients (and train() reports it once more): time one such
            # computation to show how much of the DP run is privacy bookkeeping rather than training.
            per_call, _ = timed(trainer.privacy.max_epsilon)
            run["epsilon_bookkeeping_s_est"] = per_call * (setup.rounds + 1)
    else:
        run["optimizer_steps"] = trainer.state.global_step
    return run


def summarise(runs: dict[str, list[dict[str, Any]]], kinds: dict[str, str]) -> list[dict[str, Any]]:
    """Medians per variant and the median of the per-repetition ratios to the central baseline."""
    central = runs["central"]
    rows = []
    for name, repeats in runs.items():
        ratios = [r["examples_per_s"] / c["examples_per_s"] for r, c in zip(repeats, central, strict=True)]
        target = TARGETS[kinds[name]]
        ratio = median(ratios)
        row = {
            "variant": name,
            "examples_per_s": median(r["examples_per_s"] for r in repeats),
            "seconds": median(r["seconds"] for r in repeats),
            "examples": median(r["examples"] for r in repeats),
            "optimizer_steps": repeats[0]["optimizer_steps"],
            "ratio_to_central": ratio,
            "ratio_of_medians": median(r["examples_per_s"] for r in repeats)
            / median(c["examples_per_s"] for c in central),
            "target": target,
            "met": None if target is None else ratio >= target,
            "ratios": ratios,
        }
        if "epsilon_bookkeeping_s_est" in repeats[0]:
            # What the ratio would be if computing epsilon were free: how much of the gap is bookkeeping.
            row["epsilon_bookkeeping_s_est"] = median(r["epsilon_bookkeeping_s_est"] for r in repeats)
            row["ratio_without_bookkeeping"] = median(
                r["examples"] / max(r["seconds"] - r["epsilon_bookkeeping_s_est"], 1e-9) / c["examples_per_s"]
                for r, c in zip(repeats, central, strict=True)
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--methods", nargs="+", default=None, help="DP variants of these methods only (default: all).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 8 steps, no warm-up, RDP accountant.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per variant (default 48; quick 8).")
    parser.add_argument("--batch-size", type=int, default=None, help="Batch size (default 32; quick minilm 8).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=None, help="Local steps per round (default 3; quick 1).")
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved repetitions (medians are reported).")
    parser.add_argument("--train-examples", type=int, default=None, help="Training examples (default: all / 4096).")
    parser.add_argument("--max-length", type=int, default=48, help="Tokens per tweet (minilm).")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="Fixed DP noise: no calibration.")
    parser.add_argument("--accountant", default=None, help="DP accountant (default: the library's prv; quick: rdp).")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--no-warmup", action="store_true", help="Skip the untimed warm-up pass (quick skips it).")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    quick = options.quick
    setup = Setup(
        steps=options.steps or (8 if quick else 48),
        batch_size=options.batch_size or (8 if quick and options.model == "minilm" else 32),
        clients=options.clients,
        local_steps=options.local_steps or (1 if quick else 3),
        lora_r=options.lora_r,
        lora_alpha=options.lora_alpha,
        learning_rate=options.learning_rate,
        noise_multiplier=options.noise_multiplier,
        accountant=options.accountant or ("rdp" if quick else "prv"),
        seed=options.seed,
    )
    if setup.steps % (setup.clients * setup.local_steps):
        parser.error(f"--steps {setup.steps} must be a multiple of clients x local steps")
    train_examples = options.train_examples or (2048 if quick and options.model == "minilm" else None)

    quiet()
    set_threads(options.threads)
    task = load_task(options.model, train_examples=train_examples, max_length=options.max_length, seed=options.seed)
    chosen = variants(options.methods)
    print(
        f"{options.model}: {len(task.train)} training examples, batch {setup.batch_size}, {setup.steps} optimizer "
        f"steps per variant (federated: {setup.rounds} rounds x {setup.clients} clients x {setup.local_steps} local "
        f"steps), DP noise multiplier {setup.noise_multiplier} ({setup.accountant}), {options.repeats} repetitions",
        flush=True,
    )
    if not (options.no_warmup or quick):  # first-call costs (lazy imports, kernel selection) land here, untimed
        warmup = Setup(**{**setup.__dict__, "steps": setup.clients, "local_steps": 1})
        for variant in chosen:
            run_once(variant, task, warmup)

    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in chosen}
    for repeat in range(options.repeats):
        for variant in chosen:
            run = run_once(variant, task, setup)
            runs[variant.name].append(run)
            print(
                f"  repetition {repeat + 1}/{options.repeats} {variant.name:<12} {run['seconds']:7.2f} s  "
                f"{run['examples_per_s']:9.1f} examples/s",
                flush=True,
            )

    rows = summarise(runs, {v.name: v.kind for v in chosen})
    table = [
        [
            row["variant"],
            row["examples_per_s"],
            row["seconds"],
            int(row["examples"]),
            row["optimizer_steps"],
            row["ratio_to_central"],
            "" if row["target"] is None else f">= {row['target']}",
            {None: "", True: "yes", False: "NO"}[row["met"]],
            row.get("epsilon_bookkeeping_s_est"),
            row.get("ratio_without_bookkeeping"),
        ]
        for row in rows
    ]
    headers = [
        "variant",
        "examples/s",
        "train s",
        "examples",
        "steps",
        "ratio",
        "target",
        "met",
        "epsilon s",
        "ratio w/o",
    ]
    print()
    print(format_table(headers, table))
    print(
        "\nratio: median over repetitions of examples/s relative to central; epsilon s: estimated time spent "
        "computing epsilon (per round and at the end); ratio w/o: the ratio with that time taken out"
    )
    path = write_results(
        f"throughput_{options.model}" + ("_quick" if quick else ""),
        {
            "model": options.model,
            "quick": quick,
            "setup": {**setup.__dict__, "rounds": setup.rounds, "train_examples": len(task.train)},
            "targets": {"fed": TARGETS["fed"], "dp": TARGETS["dp"]},
            "summary": rows,
            "runs": runs,
        },
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
