"""How large a fixed loss scale should fp16 use under DP? Per-example gradients under fp16 autocast vs float32.

Under DP the fp16 loss scale cannot adapt to overflows the way GradScaler does (the overflows depend on secret
examples), so it is fixed and public (`dp_fp16_loss_scale`), and an example whose scaled gradient overflows
contributes zero. Too small a scale and small per-example gradients underflow in fp16; too large and examples
overflow and are dropped. This measures both on MiniLM with FFA-LoRA at the recipe (r=8 on query/value of layers
3-5, a fresh head): the per-example gradients the Opacus hooks record, as the trainer computes them (the batch's
summed loss times the scale, backward, divided by the scale in float32), under fp16 autocast against the same
in float32. Two model states: the fresh head (predictions near uniform) and the head's weights times 30
(confident predictions, where d loss / d logits approaches 1 and a large scale overflows the logits' gradient).

CPU autocast stands in for a GPU's fp16 here (the arithmetic is IEEE fp16 either way; no GPU was lent).

    .venv/bin/python benchmarks/diagnostics/fp16_loss_scale.py      # ~9 min on 2 cores (fp16 on this CPU is slow)
"""

from __future__ import annotations

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: common.py)

# isort: split

from common import ffa_lora_recipe_model, format_table, quiet, write_results

# isort: split

import argparse

import numpy as np
import torch
from opacus.grad_sample import GradSampleHooks

from hf_fedlora.federation.adapter_state import HEAD, factor_of
from hf_fedlora.privacy.per_example_loss import summed_example_losses

EXAMPLES, BATCH = 256, 32
SCALES = (1.0, 2.0**4, 2.0**8, 2.0**12, 2.0**16)


def per_example_gradients(model, batches, scale: float | None) -> torch.Tensor:
    """(examples, trained parameters) per-example gradients; scale None means float32, no autocast."""
    rows = []
    for inputs in batches:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=scale is not None):
            loss, _ = summed_example_losses(model, inputs, len(inputs["labels"]), causal_lm=False)
        (loss * (scale or 1.0)).backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        rows.append(torch.cat([p.grad_sample.float().reshape(len(p.grad_sample), -1) for p in trained], dim=1))
        for parameter in trained:
            parameter.grad_sample = None
    gradients = torch.cat(rows)
    return gradients if scale is None else gradients / scale


def compare(model, batches) -> list[list]:
    reference = per_example_gradients(model, batches, None)
    rows = []
    for scale in SCALES:
        half = per_example_gradients(model, batches, scale)
        finite = torch.isfinite(half).all(dim=1)
        error = (half - reference).norm(dim=1) / reference.norm(dim=1)
        zeros = (half == 0) & (reference != 0)  # entries that underflowed to zero
        rows.append(
            [
                f"2^{int(np.log2(scale))}",
                float((~finite).float().mean()),
                float(error[finite].median()) if finite.any() else float("nan"),
                float(error[finite].quantile(0.99)) if finite.any() else float("nan"),
                float(zeros[finite].float().mean()) if finite.any() else float("nan"),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)  # no options: --help only
    quiet()
    tokenizer, train, model = ffa_lora_recipe_model(train_examples=EXAMPLES)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=True)
    batches = []
    for start in range(0, EXAMPLES, BATCH):
        rows = [train[i] for i in range(start, start + BATCH)]
        batch = tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows], return_tensors="pt")
        batch["labels"] = torch.tensor([r["label"] for r in rows])
        batches.append(dict(batch))
    head = [p for n, p in model.named_parameters() if factor_of(n) == HEAD and n.endswith("weight")]
    results = {}
    for state in ("fresh head", "confident head (weights x30)"):
        if state.startswith("confident"):
            with torch.no_grad():
                for weight in head:
                    weight.mul_(30)
        rows = compare(model, batches)
        results[state] = rows
        print(f"\n{state}: {EXAMPLES} tweets, per-example gradients of lora_B and the head")
        print(
            format_table(
                ["loss scale", "overflowed (dropped)", "median rel. error", "p99 rel. error", "entries flushed to 0"],
                rows,
            )
        )
    hooks.cleanup()
    path = write_results("fp16_loss_scale", {"examples": EXAMPLES, "scales": list(SCALES), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
