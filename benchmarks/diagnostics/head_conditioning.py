"""A diagnostic: why a fresh head on BERT's pooler learns slowly in the recipe's 24 noisy steps.

The recipe's FFA-LoRA trains lora_B and the head; with lora_B held at zero (factor_rates.py --scale_b 0) the head
alone reaches only ~0.59 on validation, where a converged logistic regression on the same frozen feature reaches
~0.72. This script asks whether the feature, not the privacy, is the reason. It extracts three frozen MiniLM features
of lr_sweep.py's training and validation tweets (the pooler BertForSequenceClassification reads, the [CLS] state and
the mean over tokens), prints how much of each feature's energy lies in the one direction shared by every tweet,
and then simulates the recipe for a linear head on each feature: the trainer's Dirichlet(0.5) partition of the
same tweets into 8 clients, Poisson batches of expected size 96, per-example clipping to 1, Gaussian noise at each
client's calibrated noise multiplier for (8, 1e-6) over 24 steps (PRV, as the trainer plans), Adam with fresh state
every client-round, FedAvg weighted by client size, 6 rounds x 4 local steps. It is a model of the head only (no
LoRA, no backbone), in numpy-sized torch, checked against the real head-only runs (benchmarks/RESULTS.md#head-input).

    .venv/bin/python benchmarks/diagnostics/head_conditioning.py  # ~9 min on 2 CPU cores, mostly feature extraction
"""

from __future__ import annotations

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: common.py)

# isort: split

from common import format_table, quiet, write_results

# isort: split

import argparse

import numpy as np
import torch
from frozen_probe import features
from sklearn.linear_model import LogisticRegression
from transformers import AutoModel, DataCollatorWithPadding

from hf_fedlora.demo_task import load_tweet_task
from hf_fedlora.federation.partition import partition_dataset
from hf_fedlora.offline_assets import minilm_path
from hf_fedlora.privacy.calibration import calibrate_noise_multiplier

# (name, feature, standardise, rounds, private, learning rate): the recipe's head, then one change each
VARIANTS = [
    ("pooler (the recipe's head)", "pooler", False, 6, True, 5e-2),
    ("pooler, no DP", "pooler", False, 6, False, 5e-2),
    ("pooler, 4x the rounds", "pooler", False, 24, True, 5e-2),
    ("pooler, lr 0.2", "pooler", False, 6, True, 2e-1),
    ("pooler standardised (data statistics: diagnostic only)", "pooler", True, 6, True, 5e-2),
    ("[CLS] state", "cls", False, 6, True, 5e-2),
    ("mean over tokens", "mean", False, 6, True, 5e-2),
    ("mean over tokens, lr 0.1", "mean", False, 6, True, 1e-1),
]


def simulate_head(x, y, clients, sigmas, val_x, val_y, *, rounds, private, lr, args, seed) -> float:
    """Validation accuracy of a linear head trained as the recipe trains it (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, x.shape[1], generator=generator) * 0.02  # BERT's initializer_range
    bias = torch.zeros(3)
    for _ in range(rounds):
        total_w, total_b, total = torch.zeros_like(weight), torch.zeros_like(bias), 0.0
        for rows, sigma in zip(clients, sigmas, strict=True):
            params = [weight.clone(), bias.clone()]
            first, second = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
            rate = args.batch_size / len(rows)
            for step in range(1, args.local_steps + 1):
                if private:  # Poisson sampling, clip each example's gradient, noise on the sum
                    batch = rows[torch.rand(len(rows), generator=generator) < rate]
                else:
                    batch = rows[torch.randperm(len(rows), generator=generator)[: args.batch_size]]
                error = torch.softmax(x[batch] @ params[0].T + params[1], dim=-1)
                error[torch.arange(len(batch)), y[batch]] -= 1.0  # d loss / d logits
                grads = [error[:, :, None] * x[batch][:, None, :], error]
                if private:
                    norms = torch.sqrt((grads[0] ** 2).sum((1, 2)) + (grads[1] ** 2).sum(1))
                    scale = torch.clamp(args.clip_norm / (norms + 1e-6), max=1.0)
                    clipped = [(grads[0] * scale[:, None, None]).sum(0), (grads[1] * scale[:, None]).sum(0)]
                    noise = [torch.randn(p.shape, generator=generator) * sigma * args.clip_norm for p in params]
                    grads = [(c + n) / args.batch_size for c, n in zip(clipped, noise, strict=True)]
                else:
                    grads = [g.mean(0) for g in grads]
                for p, g, m, v in zip(params, grads, first, second, strict=True):  # Adam, torch's defaults
                    m.mul_(0.9).add_(g, alpha=0.1)
                    v.mul_(0.999).addcmul_(g, g, value=0.001)
                    p.sub_(lr * (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8))
            total_w += len(rows) * params[0]
            total_b += len(rows) * params[1]
            total += len(rows)
        weight, bias = total_w / total, total_b / total
    return float(((val_x @ weight.T + bias).argmax(-1) == val_y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Partition, sampling and noise.")
    parser.add_argument("--batch_size", type=int, default=96)
    parser.add_argument("--local_steps", type=int, default=4)
    parser.add_argument("--clip_norm", type=float, default=1.0)
    parser.add_argument("--validation_size", type=int, default=500)
    args = parser.parse_args(argv)
    quiet()
    torch.manual_seed(0)

    tokenizer, train, _test = load_tweet_task(0, max_length=48, max_eval_examples=1)
    split = train.train_test_split(test_size=args.validation_size, seed=0, stratify_by_column="label")
    train, validation = split["train"], split["test"]
    model = AutoModel.from_pretrained(minilm_path()).eval()
    collator = DataCollatorWithPadding(tokenizer)
    train_x = {k: torch.tensor(v) for k, v in features(model, collator, train, batch_size=256).items()}
    val_x = {k: torch.tensor(v) for k, v in features(model, collator, validation, batch_size=256).items()}
    y, val_y = torch.tensor(train["label"]), torch.tensor(validation["label"])

    shape = []
    for name, x in train_x.items():
        mean, spread = x.mean(0), x.std(0)
        probe = LogisticRegression(C=1.0, max_iter=2000).fit(x.numpy(), y.numpy())
        converged = float((probe.predict(val_x[name].numpy()) == val_y.numpy()).mean())
        shared = float(mean.norm() ** 2 / (x.norm(dim=1) ** 2).mean())
        shape.append([name, shared, float(spread.median()), float(x.norm(dim=1).mean()), converged])
    print(
        format_table(
            ["feature", "energy in the shared mean", "median std per dim", "mean norm", "converged probe"], shape
        )
    )

    indexed = train.add_column("row", list(range(len(train))))
    clients_by_seed = {  # the trainer's partition for each seed, shared by every variant
        seed: [
            torch.tensor(data["row"])
            for data in partition_dataset(
                indexed, scheme="dirichlet", num_clients=8, seed=seed, dirichlet_alpha=0.5
            ).values()
        ]
        for seed in args.seeds
    }
    runs = []
    for label, feature, standardise, rounds, private, lr in VARIANTS:
        x, vx = train_x[feature], val_x[feature]
        if standardise:
            mean, spread = x.mean(0), x.std(0) + 1e-6
            x, vx = (x - mean) / spread, (vx - mean) / spread
        scores = []
        for seed in args.seeds:
            rows = clients_by_seed[seed]
            steps = rounds * args.local_steps
            sigmas = [
                calibrate_noise_multiplier(8.0, 1e-6, args.batch_size / len(r), steps, "prv") if private else 0.0
                for r in rows
            ]
            scores.append(
                simulate_head(
                    x, y, rows, sigmas, vx, val_y, rounds=rounds, private=private, lr=lr, args=args, seed=seed
                )
            )
        mean_score = float(np.mean(scores))
        runs.append(
            {"variant": label, "feature": feature, "rounds": rounds, "private": private, "learning_rate": lr}
            | {"accuracy_per_seed": scores, "accuracy_mean": mean_score}
        )
        print(f"{label}: {np.round(scores, 3)} mean {mean_score:.3f}", flush=True)
    columns = ["variant", "rounds", "private", "learning_rate", "accuracy_mean"]
    header = ["head on", "rounds", "DP", "lr", "val. accuracy (mean of seeds)"]
    print(format_table(header, [[run[c] for c in columns] for run in runs]))
    names = ["feature", "energy_in_shared_mean", "median_std", "mean_norm", "converged_probe"]
    results = {"settings": vars(args), "features": [dict(zip(names, row, strict=True)) for row in shape], "runs": runs}
    print(f"wrote {write_results('head_conditioning', results)}")


if __name__ == "__main__":
    main()
