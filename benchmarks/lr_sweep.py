"""Learning-rate sweep for methods without a measured rate, scored on VALIDATION tweets (never the test tweets).

A validation split is carved from the training tweets (stratified, fixed seed); the federation trains on the
rest and each (method, rate) run is scored on the validation split. Runs use utility.py's `run_federated`
(same example budget for every method: DEeR splits its local steps between its two sub-rounds) in the demo's
setting (utility.py's defaults, the recipe): 8 Dirichlet(0.5) clients, logical batch 96 in micro-batches of 16,
6 rounds x 4 local steps, LoRA on MiniLM's layers 3-5, dropout off, target (8, 1e-6) per client, unit one
example; any utility.py flag changes it. One seed; the DP noise comes from OS entropy (two runs of the batch-64
recipe differed by 0.002 in accuracy; other seeds by 0.02-0.03). The chosen
rates go, with this command and its numbers, into `hf_fedlora.comparison.DEFAULT_LEARNING_RATES`.

    .venv/bin/python benchmarks/lr_sweep.py                                   # rolora, deer, la_lora x 3 rates
    .venv/bin/python benchmarks/lr_sweep.py --methods deer --rates 1e-2 3e-2  # other utility.py flags pass through
"""

from __future__ import annotations

from common import format_table, quiet, write_results

# isort: split

import argparse
import time
import warnings

from utility import parse_args as utility_args
from utility import parse_epsilon, run_federated

from hf_fedlora.demo_task import load_tweet_task

DEMO_SETTING = ["--seeds", "0"]  # otherwise utility.py's defaults: the recipe the demo also uses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rolora", "deer", "la_lora"])
    parser.add_argument("--rates", type=float, nargs="+", default=[5e-3, 2e-2, 5e-2])
    parser.add_argument(
        "--epsilon", type=parse_epsilon, default=8.0, help="Target epsilon per client (the demo's); none: no DP."
    )
    parser.add_argument("--validation_size", type=int, default=500, help="Tweets carved from the training split.")
    parser.add_argument("--name", default="lr_sweep", help="Results file name under benchmarks/results/.")
    own, rest = parser.parse_known_args(argv)
    args = utility_args([*DEMO_SETTING, *rest])  # flags given here win over the demo setting
    quiet()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT vs transformers 5
    seed = args.seeds[0]

    tokenizer, train, _test = load_tweet_task(  # the test tweets are not used
        args.data_seed, max_length=args.max_length, max_train_examples=args.max_train, max_eval_examples=1
    )
    split = train.train_test_split(test_size=own.validation_size, seed=args.data_seed, stratify_by_column="label")
    task = (tokenizer, split["train"], split["test"])
    print(f"{len(split['train'])} training tweets, {len(split['test'])} validation tweets (carved from training)")

    runs = []
    for method in own.methods:
        for rate in own.rates:
            started = time.perf_counter()
            run = {"method": method, "learning_rate": rate, "epsilon": own.epsilon, "seed": seed}
            run.update(run_federated(method, own.epsilon, seed, rate, task, args))
            run["seconds"] = time.perf_counter() - started
            runs.append(run)
            print(
                f"{method:<8} lr {rate:<7g} validation accuracy {run['accuracy']:.4f}  macro-F1 "
                f"{run['macro_f1']:.4f}  eps spent {run['epsilon_spent'] or 0:.3f}  ({run['seconds']:.0f} s)",
                flush=True,
            )
    best = {m: max((r for r in runs if r["method"] == m), key=lambda r: r["accuracy"]) for m in own.methods}
    rows = [
        [r["method"], f"{r['learning_rate']:g}", r["accuracy"], r["macro_f1"], r["epsilon_spent"], r["seconds"],
         "chosen" if r is best[r["method"]] else ""]
        for r in runs
    ]  # fmt: skip
    print(format_table(["method", "lr", "val accuracy", "val macro-F1", "eps spent", "s", ""], rows))
    settings = {**vars(args), **vars(own), "validation_from": "training split", "split_seed": args.data_seed}
    chosen = {m: r["learning_rate"] for m, r in best.items()}
    path = write_results(own.name, {"settings": settings, "chosen": chosen, "runs": runs})
    print(f"chosen: {chosen}\nwrote {path}")


if __name__ == "__main__":
    main()
