"""Cross-device scale: planning time, per-round overhead and peak memory for 10, 100 and 1,000 clients, and large DP
logical batches run in physical micro-batches of 32 on MiniLM.

* `plan`: K clients with Dirichlet(1) sizes (at least 16 examples each, 100 K examples in all), 10 sampled per
  round for 100 rounds, 4 local steps per round, logical batch 16, target epsilon 8, PRV accountant,
  `per_client_grid` calibration (ratio 1.25). Also times a Dirichlet(1) label partition of 100 K examples into K.
* `rounds`: a DP `FederatedTrainer` run (tiny BERT, fixed noise multiplier 1.0 so no calibration, PRV accountant
  for the epsilon log) with K Dirichlet-sized clients, 10 per round, 2 local steps of logical batch 16. Per
  round: wall time of the round and its log, against the clients' own local_round time; the overhead is the rest
  (server aggregation, the epsilon log of the round's participants when the round is logged, bookkeeping).
  `--logging_steps N` logs the epsilon spent every N rounds (Trainer's cadence; 1: every round; 0: only after the
  last round, which the median round does not see). `--model minilm`: the same with the demo's all-MiniLM-L6-v2
  (FFA-LoRA r=8) on all the offline tweets in Dirichlet(1) sizes, so a client computes as a real one does.
* `logical`: one MiniLM client, one DP step of logical batch L (q = L / 2L) in physical micro-batches of 32.

Each (part, size) runs in its own subprocess so peak RSS (`ru_maxrss`) does not mix.

    .venv/bin/python benchmarks/scale.py --part plan --sizes 10 100 1000
    .venv/bin/python benchmarks/scale.py --part rounds --sizes 10 100 1000 --logging_steps 1
    .venv/bin/python benchmarks/scale.py --part rounds --sizes 10 100 1000 --logging_steps 10
    .venv/bin/python benchmarks/scale.py --part rounds --sizes 10 100 1000 --logging_steps 1 --model minilm
    .venv/bin/python benchmarks/scale.py --part logical --sizes 32 256 1024
"""

from __future__ import annotations

from common import MODELS, ForwardCounter, format_table, load_task, quiet, write_results  # isort: split

import argparse
import atexit
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

LOGICAL_BATCH, PHYSICAL_BATCH = 16, 32


def dirichlet_sizes(num_clients: int, seed: int = 0, total: int | None = None) -> list[int]:
    """Dirichlet(1) client sizes of at least 16 examples, `total` in all (default 116 per client)."""
    rng = np.random.default_rng(seed)
    spread = (total if total is not None else 116 * num_clients) - 16 * num_clients
    return (16 + rng.multinomial(spread, rng.dirichlet(np.ones(num_clients)))).tolist()


def scratch_dir() -> str:
    """A fresh output_dir for one run (nothing is saved in it), removed when the process exits."""
    path = tempfile.mkdtemp(prefix="scale-bench-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plan(num_clients: int) -> dict:
    from datasets import Dataset

    from hf_fedlora.federation.partition import partition_dataset
    from hf_fedlora.privacy import FederatedPrivacy

    rng = np.random.default_rng(0)
    labels = Dataset.from_dict({"label": rng.integers(0, 10, 100 * num_clients).tolist()})
    started = time.perf_counter()
    try:
        partition_dataset(labels, scheme="dirichlet", num_clients=num_clients, dirichlet_alpha=1.0, seed=0)
        partition_seconds = time.perf_counter() - started
    except ValueError as error:  # an empty client: report it rather than hide it
        partition_seconds = f"refused: {error}"
    sizes = dict(zip([f"client_{i}" for i in range(num_clients)], dirichlet_sizes(num_clients), strict=True))
    participations = np.zeros(num_clients, dtype=int)
    for _ in range(100):
        participations[rng.choice(num_clients, min(10, num_clients), replace=False)] += 1
    steps = {name: 4 * int(p) for name, p in zip(sizes, participations, strict=True)}
    privacy = FederatedPrivacy(
        target_epsilon=8.0,
        target_delta=1e-7,
        noise_multiplier=None,
        clip_norm=1.0,
        accountant="prv",
        calibration="per_client_grid",
    )
    started = time.perf_counter()
    privacy.plan(sizes, LOGICAL_BATCH, steps, torch.device("cpu"))
    seconds = time.perf_counter() - started
    planned = [c for name, c in privacy.clients.items() if steps[name]]
    return {
        "clients": num_clients,
        "plan_seconds": seconds,
        "partition_seconds": partition_seconds,
        "clients_with_steps": len(planned),
        "grid_points": len({c.noise_multiplier for c in planned}),
        "sigma_range": [min(c.noise_multiplier for c in planned), max(c.noise_multiplier for c in planned)],
        "peak_mib": peak_mib(),
    }


def rounds(num_clients: int, logging_steps: int = 1, model: str = "tiny") -> dict:
    num_rounds = max(4, 2 * logging_steps)
    from peft import get_peft_model

    from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, FFALoraConfig

    if model == "tiny":
        sizes = dirichlet_sizes(num_clients)
        task = load_task("tiny", train_examples=sum(sizes))
        lora = FFALoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", lora_alpha=8)
    else:  # the offline tweets, all of them, in Dirichlet(1) sizes of at least 16; the demo's LoRA on MiniLM
        task = load_task(model)
        sizes = dirichlet_sizes(num_clients, total=len(task.train))
        lora = FFALoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS", lora_alpha=16)
    bounds = np.cumsum([0, *sizes])
    clients = {f"client_{i}": task.train.select(range(bounds[i], bounds[i + 1])) for i in range(num_clients)}
    peft_model = get_peft_model(task.fresh_model(), lora)
    args = FederatedTrainingArguments(
        output_dir=scratch_dir(),
        num_rounds=num_rounds,
        clients_per_round=min(10, num_clients),
        local_steps=2,
        per_device_train_batch_size=LOGICAL_BATCH,
        dp_noise_multiplier=1.0,
        dp_target_delta=1e-7,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="steps" if logging_steps else "no",
        logging_steps=logging_steps or 1,
        dataloader_pin_memory=False,
    )
    started = time.perf_counter()
    trainer = FederatedTrainer(peft_model, args, train_dataset=clients, data_collator=task.collator)
    setup_seconds = time.perf_counter() - started
    timings: dict[str, list[float]] = {"client": [], "round": [], "log": []}
    federation = trainer.federation  # the server half: its round, and the epsilon the log asks it for
    local_round, run_round, log_round = trainer.local_round, federation.run_round, federation.max_epsilon

    def timed(key, function):
        def wrapper(*a, **k):
            begin = time.perf_counter()
            result = function(*a, **k)
            timings[key].append(time.perf_counter() - begin)
            return result

        return wrapper

    trainer.local_round = timed("client", local_round)
    federation.run_round = timed("round", run_round)
    logged: dict[int, float] = {}

    def timed_log():  # the epsilon of the round just run, whenever the trainer asks for it
        begin = time.perf_counter()
        result = log_round()
        logged[federation.rounds_done] = logged.get(federation.rounds_done, 0.0) + time.perf_counter() - begin
        return result

    federation.max_epsilon = timed_log
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    per_round = min(10, num_clients)
    client = [sum(timings["client"][i * per_round : (i + 1) * per_round]) for i in range(num_rounds)]
    timings["log"] = [logged.get(r + 1, 0.0) for r in range(len(timings["round"]))]
    total = [r + g for r, g in zip(timings["round"], timings["log"], strict=True)]
    overhead = [t - c for t, c in zip(total, client, strict=True)]
    return {
        "model": model,
        "clients": num_clients,
        "logging_steps": logging_steps,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "plan_and_start_seconds": train_seconds - sum(total),
        "round_seconds_median": float(np.median(total)),
        "client_seconds_median": float(np.median(client)),
        "overhead_seconds_median": float(np.median(overhead)),
        "epsilon_log_seconds": timings["log"],
        "overhead_ratio_median": float(np.median([o / c for o, c in zip(overhead, client, strict=True)])),
        "overhead_ratio_mean": float(sum(overhead) / sum(client)),  # logged rounds included
        "peak_mib": peak_mib(),
    }


def logical(batch: int) -> dict:
    from peft import get_peft_model

    from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, FFALoraConfig

    task = load_task("minilm", train_examples=2 * batch)
    model = get_peft_model(
        task.fresh_model(),
        FFALoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS", lora_alpha=16),
    )
    physical = min(PHYSICAL_BATCH, batch)
    args = FederatedTrainingArguments(
        output_dir=scratch_dir(),
        num_rounds=1,
        local_steps=1,
        per_device_train_batch_size=physical,
        gradient_accumulation_steps=batch // physical,
        dp_noise_multiplier=1.0,
        dp_target_delta=1e-6,
        dp_accountant="rdp",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = FederatedTrainer(model, args, train_dataset=[task.train], data_collator=task.collator)
    counter = ForwardCounter(trainer.model)  # one training forward per micro-batch, with its examples
    before = peak_mib()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "logical_batch": batch,
        "physical_batch": physical,
        "micro_batches": counter.batches,
        "examples": counter.examples,
        "step_seconds": seconds,
        "examples_per_second": counter.examples / seconds,
        "peak_mib_before_training": before,
        "peak_mib": peak_mib(),
    }


PARTS = {"plan": plan, "rounds": rounds, "logical": logical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="client counts, or logical batches")
    parser.add_argument("--logging_steps", type=int, default=1, help="rounds: epsilon logged every N rounds (0: end)")
    parser.add_argument("--model", choices=MODELS, default="tiny", help="rounds: the clients' model and data")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        quiet()
        torch.set_num_threads(2)
        extra = {"logging_steps": args.logging_steps, "model": args.model} if args.part == "rounds" else {}
        print(json.dumps(PARTS[args.part](args.sizes[0], **extra)))
        return
    results = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--part", args.part, "--sizes", str(size), "--child"]
        command += ["--logging_steps", str(args.logging_steps), "--model", args.model]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    headers = [key for key, value in results[0].items() if not isinstance(value, list)]
    print(format_table(headers, [[result[key] for key in headers] for result in results]))
    suffix = f"_logging_steps_{args.logging_steps}" if args.part == "rounds" else ""
    if args.part == "rounds" and args.model != "tiny":
        suffix = f"_{args.model}{suffix}"
    write_results(f"scale_{args.part}{suffix}", {"results": results})


if __name__ == "__main__":
    main()
