"""Peak memory of a FederatedTrainer run as the number of clients grows (2, 16, 128 by default).

The issue's target: growth with the number of clients no more than the clients' adapter and
accountant states (plus 5%). Each client count runs in its own subprocess, so peaks don't mix, on the
same model and the same total data, under DP with a fixed noise multiplier (no 128 calibrations).
Only the number of clients may differ, so the rest is held fixed:

* the same expected batch and the same optimizer steps per round (`--steps-per-round` S: each of K
  clients runs S/K local steps), so every run draws as many Poisson batches of the same mean size;
* glibc's mmap threshold is pinned in the children (`MALLOC_MMAP_THRESHOLD_`, default 128 KiB).
  glibc otherwise raises it as large blocks are freed, after which freed activations stay resident
  and the peak becomes a high-water mark: two MiniLM runs of the same 8 steps (2 clients x 4 steps,
  8 clients x 1) peaked 92 MiB apart with glibc's default, while with the threshold pinned their RSS
  between steps differed by 3 MiB. `--mmap-threshold 0` keeps glibc's dynamic behaviour (what a
  user's process sees).

What is left is the randomness of DP itself: a step's Poisson batch runs in micro-batches of at most
`--batch-size` examples, so its activations grow with the micro-batches a run happened to draw (and its
longest tweet) up to that bound; the largest micro-batch is reported per run, and many steps per round
(the default) make runs alike.

The child reports:

* peak RSS of the whole process (`ru_maxrss`: loading, partitioning and training), which is judged;
* peak RSS during `train()` alone (psutil polling) and RSS just before it, for context;
* the bytes the clients' states actually take: per client its sampling and noise RNG states
  (`generator.get_state()`) and its accountant (history entries + object), plus the payloads the
  server holds during aggregation: one running sum (`payload_nbytes` of one upload) for a method whose
  aggregate streams (a weighted mean folds each upload in as it arrives), else participants x that.

Allowed growth from 2 to K clients = expected(K) - expected(2) + 5% of the 2-client peak.

    .venv/bin/python benchmarks/memory.py --model tiny
    .venv/bin/python benchmarks/memory.py --model minilm
    .venv/bin/python benchmarks/memory.py --quick          # smoke run: tiny model, 2 and 32 clients
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from typing import Any

# common comes first: it puts the Hugging Face libraries in offline mode before they are imported.
from common import ForwardCounter, format_table, load_task, quiet, set_threads, silence_printer, write_results

# isort: split
import psutil
from peft import get_peft_model

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
from hf_fedlora.federation.adapter_state import adapter_parameters, parameters_of, payload_nbytes
from hf_fedlora.methods import CONFIG_CLASSES

MIB = 2**20
SLACK = 0.05  # "plus 5%" of the 2-client peak
RESULT_PREFIX = "MEMORY_RESULT "
PASSED_TO_CHILD = (
    "model",
    "train_examples",
    "rounds",
    "steps_per_round",
    "batch_size",
    "noise_multiplier",
    "accountant",
    "lora_r",
    "lora_alpha",
    "seed",
)
METHODS = {config_cls.method_class.name: config_cls for config_cls in CONFIG_CLASSES}


class PeakRSS:
    """Polls this process's RSS in a background thread: the peak of one phase, which ru_maxrss can't isolate."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def accountant_nbytes(accountant: Any) -> int:
    """The accountant object, its attribute dict and its (noise, rate, steps) history, as Python holds them."""
    size = sys.getsizeof(accountant) + sys.getsizeof(vars(accountant)) + sys.getsizeof(accountant.history)
    for entry in accountant.history:
        size += sys.getsizeof(entry) + sum(sys.getsizeof(value) for value in entry)
    return size


def client_states(trainer: FederatedTrainer) -> dict[str, int]:
    """Bytes of what the trainer keeps per client, and of the payloads it holds at once while aggregating.

    Each client's DP state is its `ClientPrivacy` (the trainer's public `privacy.clients`): its secret sampling and
    noise generators and its accountant.
    """
    clients = trainer.privacy.clients.values()
    sampling_rng = sum(c.sampling_generator.get_state().numel() for c in clients)
    noise_rng = sum(c.noise_generator.get_state().numel() for c in clients)
    accountants = sum(accountant_nbytes(c.accountant) + sys.getsizeof(c) for c in clients)
    participants = trainer.args.clients_per_round or len(trainer.client_datasets)
    upload = parameters_of(adapter_parameters(trainer.model), trainer.method.uploaded_factors(0, 0))
    payload = payload_nbytes(upload)
    streams = trainer.method.streaming_aggregator() is not None
    payloads = payload if streams else participants * payload
    return {
        "sampling_rng_bytes": sampling_rng,
        "noise_rng_bytes": noise_rng,
        "accountant_bytes": accountants,
        "payload_bytes": payload,
        "streaming_aggregation": streams,
        "payloads_held_bytes": payloads,
        "expected_bytes": sampling_rng + noise_rng + accountants + payloads,
    }


def run_child(options: argparse.Namespace) -> dict[str, Any]:
    """One whole run with `options.clients` clients, in this (fresh) process."""
    quiet()
    set_threads(options.threads)
    task = load_task(options.model, train_examples=options.train_examples, seed=options.seed)
    config = METHODS[options.method](
        r=options.lora_r, lora_alpha=options.lora_alpha, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    model = get_peft_model(task.fresh_model(), config)
    with tempfile.TemporaryDirectory() as output_dir:
        args = FederatedTrainingArguments(
            output_dir=output_dir,
            num_rounds=options.rounds,
            num_clients=options.clients,
            local_steps=options.steps_per_round // options.clients,
            partition="iid",
            per_device_train_batch_size=options.batch_size,
            learning_rate=5e-4,
            dp_noise_multiplier=options.noise_multiplier,
            dp_secret_seed=options.seed,
            dp_accountant=options.accountant,
            seed=options.seed,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            dataloader_pin_memory=False,
        )
        trainer = silence_printer(
            FederatedTrainer(model=model, args=args, train_dataset=task.train, data_collator=task.collator)
        )
        counter = ForwardCounter(trainer.model)
        rss_before_train = psutil.Process().memory_info().rss
        with PeakRSS() as during_train:
            trainer.train()
    return {
        "method": options.method,
        "clients": options.clients,
        "train_examples": len(task.train),
        "optimizer_steps": options.rounds * options.steps_per_round,
        "largest_batch": counter.largest_batch,
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "peak_rss_bytes": max_rss_bytes(),
        "train_peak_rss_bytes": during_train.peak,
        "rss_before_train_bytes": rss_before_train,
        **client_states(trainer),
    }


def spawn(options: argparse.Namespace, method: str, clients: int) -> dict[str, Any]:
    """Run one client count in a fresh interpreter and read back its result line."""
    command = [sys.executable, __file__, "--child", "--method", method, "--clients", str(clients)]
    for name in PASSED_TO_CHILD:
        command += [f"--{name.replace('_', '-')}", str(getattr(options, name))]
    if options.threads is not None:
        command += ["--threads", str(options.threads)]
    env = dict(os.environ)
    if options.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(options.mmap_threshold)
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise RuntimeError(f"the {clients}-client run of {method} failed (exit code {completed.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def judge(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Growth of each count over the smallest one, against the allowed growth."""
    base = min(runs, key=lambda run: run["clients"])
    for run in runs:
        run["growth_bytes"] = run["peak_rss_bytes"] - base["peak_rss_bytes"]
        run["train_growth_bytes"] = run["train_peak_rss_bytes"] - base["train_peak_rss_bytes"]
        run["expected_growth_bytes"] = run["expected_bytes"] - base["expected_bytes"]
        run["allowed_growth_bytes"] = run["expected_growth_bytes"] + SLACK * base["peak_rss_bytes"]
        run["met"] = run["growth_bytes"] <= run["allowed_growth_bytes"]
        run["train_phase_met"] = run["train_growth_bytes"] <= run["allowed_growth_bytes"]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: 2 and 32 clients, 2048 examples, first method, RDP."
    )
    parser.add_argument("--client-counts", type=int, nargs="+", default=None, help="Default 2 16 128.")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None, help="Default: all.")
    parser.add_argument("--train-examples", type=int, default=None, help="Total examples (default 8192).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--steps-per-round", type=int, default=None, help="Steps per round over all clients (default: largest count)."
    )
    parser.add_argument(
        "--mmap-threshold", type=int, default=128 * 1024, help="glibc MALLOC_MMAP_THRESHOLD_ for the runs (0: dynamic)."
    )
    parser.add_argument("--batch-size", type=int, default=16, help="Each client's expected Poisson batch.")
    parser.add_argument("--noise-multiplier", type=float, default=1.0, help="Fixed DP noise: no calibration.")
    parser.add_argument("--accountant", default=None, help="DP accountant (default: the library's prv; quick: rdp).")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.child:
        print(RESULT_PREFIX + json.dumps(run_child(options)), flush=True)
        return

    set_threads(options.threads)  # the children get --threads too; this makes the recorded machine info match
    quick = options.quick
    counts = sorted(options.client_counts or ([2, 32] if quick else [2, 16, 128]))
    methods = options.methods or list(METHODS)[: 1 if quick else None]
    options.train_examples = options.train_examples or (2048 if quick else 8192)
    options.accountant = options.accountant or ("rdp" if quick else "prv")
    options.steps_per_round = options.steps_per_round or max(counts)
    if any(options.steps_per_round % clients for clients in counts):
        parser.error(f"--steps-per-round {options.steps_per_round} must be a multiple of every client count")
    if options.train_examples // max(counts) < options.batch_size:
        parser.error(f"{options.train_examples} examples over {max(counts)} clients is below the batch size")
    print(
        f"{options.model}: {options.train_examples} examples split iid over {counts} clients, DP (noise multiplier "
        f"{options.noise_multiplier}, {options.accountant}), batch {options.batch_size}, {options.rounds} rounds x "
        f"{options.steps_per_round} steps shared by the clients; mmap threshold {options.mmap_threshold or 'dynamic'}; "
        "one subprocess per run",
        flush=True,
    )

    results: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        runs = []
        for clients in counts:
            run = spawn(options, method, clients)
            runs.append(run)
            print(
                f"  {method:<10} {clients:4d} clients: peak RSS {run['peak_rss_bytes'] / MIB:8.1f} MiB "
                f"(largest micro-batch {run['largest_batch']})",
                flush=True,
            )
        results[method] = judge(runs)

    rows = [
        [
            run["method"],
            run["clients"],
            run["largest_batch"],
            run["peak_rss_bytes"] / MIB,
            run["train_peak_rss_bytes"] / MIB,
            run["growth_bytes"] / MIB,
            run["train_growth_bytes"] / MIB,
            run["expected_growth_bytes"] / MIB,
            run["allowed_growth_bytes"] / MIB,
            "yes" if run["met"] else "NO",
            "yes" if run["train_phase_met"] else "NO",
        ]
        for runs in results.values()
        for run in runs
    ]
    headers = [
        "method",
        "clients",
        "largest micro-batch",
        "peak MiB",
        "train peak MiB",
        "growth MiB",
        "train growth MiB",
        "expected MiB",
        "allowed MiB",
        "met",
        "met (train phase)",
    ]
    print()
    print(format_table(headers, rows))
    print(
        f"\nallowed = growth of the clients' RNG + accountant states and held payloads + {SLACK:.0%} of the first peak"
    )
    settings = {k: v for k, v in vars(options).items() if k not in ("child", "method", "clients")}
    path = write_results(
        f"memory_{options.model}" + ("_quick" if quick else ""),
        {"model": options.model, "quick": quick, "settings": {**settings, "client_counts": counts}, "runs": results},
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
