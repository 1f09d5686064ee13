"""What distributed noise costs in accuracy: client-level DP with the noise added once by the aggregator (central)
against each client adding its share for a secure sum (distributed discrete Gaussian), at the same epsilon.

Each run is the demo's task (`hf-fedlora demo`: all-MiniLM-L6-v2 on the offline tweets, FFA-LoRA at the recipe's
rate, Dirichlet(0.5) clients, 6 rounds x 4 local steps) under `--dp_unit client` and the zero-out-one relation (the
client list is public; every client in every round), with `--dp_noise_placement central` (the aggregator's noise,
PRV accountant; at sample rate 1 the same sigma as under add/remove) or `distributed` (each client's share of
discrete Gaussian noise, `--bits` per coordinate, planned for `--min_clients` surviving shares, accounted by the
Renyi-DP bound for sums of discrete Gaussians). Same seed, same clients, same
epsilon; each run in its own process (wall time and peak RSS). The secure sum is simulated in process (the same
modular arithmetic; the masks cancel exactly), so accuracy is what a Flower deployment with SecAgg gets.

    .venv/bin/python benchmarks/distributed_noise.py                      # 8 clients, epsilon 8, seeds 0 1 2
    .venv/bin/python benchmarks/distributed_noise.py --num_clients 16 --seeds 0 --name distributed_noise_16_clients
    .venv/bin/python benchmarks/distributed_noise.py --quick              # a smoke run: tiny, one round
"""

from __future__ import annotations

from common import RESULTS_DIR, write_results

# isort: split

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PLACEMENTS = ("central", "distributed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, default=8.0, help="Target epsilon (unit: one client).")
    parser.add_argument("--delta", type=float, default=1e-6)
    parser.add_argument("--num_clients", type=int, default=8)
    parser.add_argument("--min_clients", type=int, default=None, help="Fewest surviving shares (default: all).")
    parser.add_argument("--bits", type=int, default=20, help="Bits per coordinate of the secure sum.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="distributed_noise")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 1 round, 300 training tweets.")
    return parser.parse_args(argv)


def demo_command(args: argparse.Namespace, placement: str, seed: int, output_dir: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "hf_fedlora.cli",
        "demo",
        "--dp_unit",
        "client",
        "--dp_noise_placement",
        placement,
        "--dp_neighbouring_relation",  # the client list is public; at q = 1 the same sigma for central noise
        "zero_out_one",
        "--dp_target_epsilon",
        str(args.epsilon),
        "--dp_target_delta",
        str(args.delta),
        "--num_clients",
        str(args.num_clients),
        "--secure_sum_bits",
        str(args.bits),
        "--seed",
        str(seed),
        "--output_dir",
        output_dir,
        "--disable_tqdm",
        "True",
    ]
    if args.min_clients is not None:
        command += ["--min_clients_per_round", str(args.min_clients)]
    if args.quick:
        command += ["--num_rounds", "1", "--max_train_examples", "300", "--max_eval_examples", "64"]
    return command


def run_one(args: argparse.Namespace, placement: str, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as output_dir:
        start = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run(demo_command(args, placement, seed, output_dir), check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        row = json.loads((Path(output_dir) / "results.json").read_text())["rows"][0]
        record = json.loads(next(Path(output_dir).glob("*/federated_training.json")).read_text())
    privacy = record["privacy"]
    return {
        "placement": placement,
        "seed": seed,
        "accuracy": row["accuracy"],
        "macro_f1": row["macro_f1"],
        "epsilon": privacy["epsilon"],
        "noise_multiplier": privacy["noise_multiplier"],
        "accountant": privacy["accountant"],
        "distributed_noise": privacy.get("distributed_noise"),
        "seconds": seconds,
        "peak_rss_gib_upper_bound": max(before, peak_kib) / 2**20,  # the largest child so far (Linux: KiB)
    }


def spread(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_table(runs: list[dict[str, Any]]) -> str:
    lines = ["| noise | accuracy | macro-F1 | sigma | epsilon | seconds per run |", "|---|---|---|---|---|---|"]
    for placement in PLACEMENTS:
        chosen = [run for run in runs if run["placement"] == placement]
        if chosen:
            column = {key: [run[key] for run in chosen] for key in ("accuracy", "macro_f1", "noise_multiplier")}
            lines.append(
                f"| {placement} | {spread(column['accuracy'])} | {spread(column['macro_f1'])} | "
                f"{spread(column['noise_multiplier'])} | {max(run['epsilon'] for run in chosen):.3f} | "
                f"{statistics.mean(run['seconds'] for run in chosen):.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        for placement in PLACEMENTS:
            run = run_one(args, placement, seed)
            runs.append(run)
            print(
                f"seed {seed} {placement:11s} accuracy {run['accuracy']:.3f} macro-F1 {run['macro_f1']:.3f} "
                f"sigma {run['noise_multiplier']:.4f} epsilon {run['epsilon']:.3f} ({run['seconds']:.0f} s)",
                flush=True,
            )
    table = summary_table(runs)
    print(table)
    settings = {key: value for key, value in vars(args).items() if key != "name"}
    path = write_results(args.name, {"settings": settings, "runs": runs, "table": table})
    (RESULTS_DIR / f"{args.name}.md").write_text(table + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
