"""Bytes each client uploads, per round and over a whole run, for every federated method.

Why measured and not computed: the trainer's real uploads are what goes on the wire, so
a method whose `uploaded_factors` disagrees with what it trains (or sends the head when it
should not) shows up here. One short FederatedTrainer run per (model, method), on a few
random token sequences (the content of the data does not change the size of an upload),
records every client's upload; its size is split into the LoRA factors and the task head
(PEFT's modules_to_save). Runs are non-private: DP noise changes values, not sizes.

A whole run is the sum over rounds of the method's own schedule (`num_sub_rounds`,
`uploaded_factors`), checked equal to the measured uploads for the rounds that ran, and
assumes every client takes part in every round (no client sampling, no budget stop).

    .venv/bin/python benchmarks/communication.py            # MiniLM and roberta-base shape, 10 and 100 rounds
    .venv/bin/python benchmarks/communication.py --quick    # smoke run: MiniLM only, 1 measured round
"""

from __future__ import annotations

from common import format_table, quiet, write_results

# isort: split

import argparse
import logging
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from transformers.trainer_callback import PrinterCallback

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
from hf_fedlora.federation.adapter_state import (
    HEAD,
    LORA_A,
    LORA_B,
    adapter_parameters,
    factor_of,
    parameters_of,
    payload_nbytes,
)
from hf_fedlora.methods import CONFIG_CLASSES, FedLoraConfig

LORA_FACTORS = (LORA_A, LORA_B)


class RecordingTrainer(FederatedTrainer):
    """A FederatedTrainer that keeps the size of every upload a client actually returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.upload_sizes: list[dict] = []  # one entry per (round, sub-round, client) upload

    def local_round(self, name, round_index, sub_round, steps):
        upload, losses = super().local_round(name, round_index, sub_round, steps)
        if upload is not None:
            lora, head = split_nbytes(upload)
            self.upload_sizes.append(
                {"round": round_index, "sub_round": sub_round, "client": name, "lora": lora, "head": head}
            )
        return upload, losses


def split_nbytes(payload: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of the LoRA factors, bytes of the task head) of one payload."""
    lora = payload_nbytes({k: v for k, v in payload.items() if factor_of(k) in LORA_FACTORS})
    head = payload_nbytes({k: v for k, v in payload.items() if factor_of(k) == HEAD})
    if lora + head != payload_nbytes(payload):
        raise AssertionError("payload holds tensors that are neither LoRA factors nor task head")
    return lora, head


def declared_round_nbytes(model: nn.Module, method, round_index: int) -> tuple[int, int]:
    """(LoRA, head) bytes one client sends in a round according to the method's schedule, no training."""
    adapter = adapter_parameters(model)
    lora = head = 0
    for sub_round in range(method.num_sub_rounds(round_index)):
        part_lora, part_head = split_nbytes(parameters_of(adapter, method.uploaded_factors(round_index, sub_round)))
        lora, head = lora + part_lora, head + part_head
    return lora, head


def random_tokens(vocab_size: int, num_labels: int, n: int = 8, seq_len: int = 8) -> Dataset:
    """A few random sequences: enough for one local step per client, and sizes do not depend on content."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (n, seq_len), generator=generator)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n, "label": labels.tolist()}
    )


def measure_by_training(peft_model: nn.Module, rounds: int, output_dir: str) -> dict[int, tuple[int, int]]:
    """Run `rounds` real rounds (2 clients, 1 local step, batch 2) and return each round's (LoRA, head) bytes.

    Every client must send the same amount in a round; a mismatch would be a bug worth seeing, so it raises.
    """
    config = peft_model.config
    data = random_tokens(config.vocab_size, config.num_labels)
    args = FederatedTrainingArguments(
        output_dir=output_dir,
        num_rounds=rounds,
        num_clients=2,
        local_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
    )
    trainer = RecordingTrainer(model=peft_model, args=args, train_dataset=data)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    per_client_round: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for entry in trainer.upload_sizes:
        sizes = per_client_round[(entry["client"], entry["round"])]
        sizes[0] += entry["lora"]
        sizes[1] += entry["head"]
    measured: dict[int, tuple[int, int]] = {}
    for (client, round_index), sizes in sorted(per_client_round.items()):
        if measured.setdefault(round_index, tuple(sizes)) != tuple(sizes):
            raise AssertionError(f"round {round_index}: client {client} sent {sizes}, another {measured[round_index]}")
    return measured


def minilm() -> nn.Module:
    from hf_fedlora.demo_task import minilm_classifier

    return minilm_classifier()


def roberta_base_shape() -> nn.Module:
    """roberta-base's shape (RobertaConfig defaults) with random weights: sizes only, nothing downloaded."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(num_labels=2))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "all-MiniLM-L6-v2": minilm,
    "roberta-base (shape, random init)": roberta_base_shape,
}


def full_model_nbytes(model: nn.Module) -> int:
    """What full fine-tuning with FedAvg would send each round: every parameter of the model."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure_model(model_name: str, build, config_classes, rounds_list, train: bool, measured_rounds: int) -> list[dict]:
    """One row per method: measured per-round bytes (or read off the schedule), whole-run totals, full model."""
    rows = []
    for config_cls in config_classes:
        torch.manual_seed(0)
        base = build()
        full = full_model_nbytes(base)
        config = config_cls(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(base, config)
        method = config.build_method()
        started = time.perf_counter()
        if train:
            with tempfile.TemporaryDirectory() as output_dir:
                measured = measure_by_training(model, measured_rounds, output_dir)
            how = f"trained {measured_rounds} rounds, 2 clients x 1 step; payload_nbytes of each upload"
        else:
            measured = {r: declared_round_nbytes(model, method, r) for r in range(measured_rounds)}
            how = "read off uploaded_factors (no training): payload_nbytes(parameters_of(adapter, ...))"
        declared = {r: declared_round_nbytes(model, method, r) for r in range(max(rounds_list))}
        mismatch = {r: (measured[r], declared[r]) for r in measured if measured[r] != declared[r]}
        if mismatch:
            print(f"WARNING {model_name} {method.name}: measured != schedule (round: (measured, schedule)) {mismatch}")
        lora_round, head_round = (sum(v[i] for v in measured.values()) / len(measured) for i in (0, 1))
        rows.append(
            {
                "model": model_name,
                "method": method.name,
                "config_class": config_cls.__name__,
                "sub_rounds_per_round": [method.num_sub_rounds(r) for r in range(measured_rounds)],
                "lora_bytes_per_round": lora_round,
                "head_bytes_per_round": head_round,
                "total_bytes_per_round": lora_round + head_round,
                "measured_rounds": {r: {"lora": v[0], "head": v[1]} for r, v in measured.items()},
                "schedule_matches_measurement": not mismatch,
                "whole_run_bytes": {str(n): sum(sum(declared[r]) for r in range(n)) for n in rounds_list},
                "full_model_bytes_per_round": full,
                "measured_by": how,
                "seconds": time.perf_counter() - started,
            }
        )
        del model, base
    reference = next((row for row in rows if row["config_class"] == FedLoraConfig.__name__), None)
    for row in rows:
        row["ratio_to_lora"] = row["total_bytes_per_round"] / reference["total_bytes_per_round"] if reference else None
        row["lora_ratio_to_lora"] = (
            row["lora_bytes_per_round"] / reference["lora_bytes_per_round"] if reference else None
        )
    return rows


def human(nbytes: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes:.0f} B"


def print_table(rows: list[dict], rounds_list: list[int]) -> None:
    headers = ["model", "method", "sub-rounds", "LoRA/round", "head/round", "total/round", "x lora", "LoRA x lora"]
    headers += [f"total, {n} rounds" for n in rounds_list] + ["full model/round"]
    table = [
        [
            row["model"],
            row["method"],
            "/".join(map(str, row["sub_rounds_per_round"])),
            human(row["lora_bytes_per_round"]),
            human(row["head_bytes_per_round"]),
            human(row["total_bytes_per_round"]),
            f"{row['ratio_to_lora']:.3f}x" if row["ratio_to_lora"] is not None else "",
            f"{row['lora_ratio_to_lora']:.3f}x" if row["lora_ratio_to_lora"] is not None else "",
            *(human(row["whole_run_bytes"][str(n)]) for n in rounds_list),
            human(row["full_model_bytes_per_round"]),
        ]
        for row in rows
    ]
    print(format_table(headers, table))
    print("\nUpload of ONE client; float32; r=8 on query/value; head = modules_to_save (the classifier).")
    print("x lora: total per round relative to FedLoraConfig (lora); 'LoRA x lora' compares the LoRA part alone.")
    print("full model/round: every parameter (full fine-tuning with FedAvg), for scale.")
    for model in dict.fromkeys(row["model"] for row in rows):
        how = {row["measured_by"] for row in rows if row["model"] == model}
        print(f"{model}: {'; '.join(sorted(how))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, nargs="+", default=[10, 100], help="Run lengths for the totals.")
    parser.add_argument("--measured_rounds", type=int, default=2, help="Real rounds run per (model, method).")
    parser.add_argument(
        "--no_train_roberta",
        action="store_true",
        help="Read the roberta-base uploads off the method's schedule instead of training (faster).",
    )
    parser.add_argument("--quick", action="store_true", help="Smoke run: MiniLM only, 1 measured round.")
    args = parser.parse_args()
    quiet()
    logging.getLogger("hf_fedlora").setLevel(logging.ERROR)  # "non-private run" is intended here
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT vs transformers 5
    if args.quick:
        args.measured_rounds = 1
    models = {"all-MiniLM-L6-v2": MODELS["all-MiniLM-L6-v2"]} if args.quick else MODELS
    rows = []
    for name, build in models.items():
        train = not (args.no_train_roberta and name.startswith("roberta"))
        rows += measure_model(name, build, CONFIG_CLASSES, args.rounds, train, args.measured_rounds)
    print_table(rows, args.rounds)
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "dtype": "float32"}
    settings.update(rounds=args.rounds, measured_rounds=args.measured_rounds, clients=2, local_steps=1)
    path = write_results("communication_quick" if args.quick else "communication", {"settings": settings, "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
