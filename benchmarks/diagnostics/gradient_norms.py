"""A diagnostic: how large is each trained tensor's share of an example's gradient, at the recipe's start?

Under flat clipping every example's gradient (all trained tensors together) is clipped to C and isotropic noise of
std sigma x C is added, so a tensor whose gradient is small next to the others' gets a small share of the signal
and the same noise. This prints, for FFA-LoRA at the recipe of that time (MiniLM as BertForSequenceClassification,
r=8 on query/value of layers 3-5, a fresh head on the pooler, dropout off), the median and 10th/90th percentiles
of each tensor kind's per-example gradient norm over training tweets, before any step.
benchmarks/RESULTS.md#per-layer-clipping: the head's is ~25x lora_B's, which is what `dp_clipping="per_layer"` was
tried against.

    .venv/bin/python benchmarks/diagnostics/gradient_norms.py      # ~20 s
"""

from __future__ import annotations

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: common.py)

# isort: split

from common import ffa_lora_recipe_model, format_table, quiet, write_results

# isort: split

import argparse

import numpy as np
import torch

from hf_fedlora.federation.adapter_state import factor_of

EXAMPLES = 64


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # no options: --help only
    quiet()
    # The measurement was of the model of its time, BertForSequenceClassification (the head reads the pooler).
    _tokenizer, train, model = ffa_lora_recipe_model(train_examples=2000, pooling="pooler")
    norms: dict[str, list[float]] = {}
    for index in range(EXAMPLES):
        example = train[index]
        model.zero_grad()
        model(
            input_ids=torch.tensor([example["input_ids"]]),
            attention_mask=torch.tensor([example["attention_mask"]]),
            labels=torch.tensor([example["label"]]),
        ).loss.backward()
        squares: dict[str, float] = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                kind = factor_of(name)
                squares[kind] = squares.get(kind, 0.0) + float((parameter.grad.float() ** 2).sum())
        squares["all together"] = sum(squares.values())
        for kind, square in squares.items():
            norms.setdefault(kind, []).append(square**0.5)
    rows = [[kind, *np.percentile(values, [50, 10, 90]).tolist()] for kind, values in norms.items()]
    print(format_table(["tensors", "median norm", "p10", "p90"], rows))
    path = write_results("gradient_norms", {"examples": EXAMPLES, "norms": {row[0]: row[1:] for row in rows}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
