"""Does federated DP instruction tuning make a causal LM answer better? SmolLM2-135M-Instruct, offline.

The task is a short-answer instruction task written by examples/instruction_tuning/make_classification_task.py
(train, validation carved from the training split, test). Every run is examples/instruction_tuning/
run_instruction_tuning.py in its own process (its wall time and peak memory are its own), at one example budget:
C i.i.d. clients x R rounds x K local steps x batch B, LoRA r=8 on q/v of the upper layers only. For each method
and privacy level (non-private, and (epsilon, 1e-5)-DP per example and client, PRV), each rate of `--rates`
trains once and is scored on the validation rows; the rate with the best validation exact match (then the lower
validation loss) is kept, and only that adapter is scored on the test rows, once. The base model (the adapter at
B = 0 adds nothing) is scored on the same test rows: the zero-shot row.

Scores: exact match (the answer's first line, lower-cased, edge punctuation dropped, equals the label), the
lenient match (the first label the generation names), the loss on the answer tokens, and the majority label's
share (what always answering one label scores).

    .venv/bin/python examples/instruction_tuning/make_classification_task.py --dataset tweets \\
        --out_dir runs/instruction_data/tweets
    .venv/bin/python benchmarks/instruction.py --data_dir runs/instruction_data/tweets --name instruction_tweets
    .venv/bin/python benchmarks/instruction.py --data_dir runs/instruction_data/tweets --quick   # smoke run
"""

from __future__ import annotations

from common import RESULTS_DIR, SMOLLM2_GGUF, format_table, quiet, smollm2_folder, write_results

# isort: split

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "instruction_tuning" / "run_instruction_tuning.py"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LAYERS = 30


def load_script():
    spec = importlib.util.spec_from_file_location("run_instruction_tuning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_instruction_tuning"] = module
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="make_classification_task.py's output.")
    parser.add_argument("--methods", nargs="+", default=["ffa_lora", "lora"])
    parser.add_argument("--epsilons", nargs="+", default=["none", "3", "8"], help="'none': non-private.")
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["ffa_lora=2e-2,5e-2", "lora=5e-3,2e-2"],
        help="Per method, the rates tried (METHOD=R1,R2,...); one rate alone skips the choice.",
    )
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lora_layers", type=int, default=8, help="LoRA on this many upper layers.")
    parser.add_argument(
        "--lora_target_modules", default="q_proj,v_proj", help="Comma-separated modules LoRA adapts in those layers."
    )
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--validation_rows", type=int, default=200)
    parser.add_argument("--test_rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="instruction", help="Results: benchmarks/results/<name>.json and .md.")
    parser.add_argument("--resume", action="store_true", help="Keep the cells already in the results file.")
    parser.add_argument("--no_base", action="store_true", help="Do not score the base model (another run does).")
    parser.add_argument(
        "--validation_only", action="store_true", help="Train and score on validation; leave the test rows unseen."
    )
    parser.add_argument(
        "--quick", action="store_true", help="Smoke run: the first method, epsilon and rate, 1 round x 1 step, 20 rows."
    )
    args = parser.parse_args(argv)
    args.epsilons = [None if e.lower() in ("none", "non-private") else float(e) for e in args.epsilons]
    args.rates = {m: [float(r) for r in rates.split(",")] for m, rates in (item.split("=") for item in args.rates)}
    missing = [m for m in args.methods if m not in args.rates]
    if missing:
        parser.error(f"--rates gives no rate for {missing}")
    if args.quick:
        args.rounds, args.local_steps, args.name = 1, 1, args.name + "_quick"
        args.validation_rows = args.test_rows = 20
        args.methods, args.epsilons = args.methods[:1], args.epsilons[-1:]
        args.rates = {m: rates[:1] for m, rates in args.rates.items()}
    return args


def train(method: str, epsilon: float | None, rate: float, output_dir: str, args) -> dict[str, Any]:
    """One run of run_instruction_tuning.py in its own process, scored on the validation rows."""
    layers = ",".join(str(i) for i in range(SMOLLM2_LAYERS - args.lora_layers, SMOLLM2_LAYERS))
    flags = [
        "--model_name_or_path", smollm2_folder(), "--gguf_file", SMOLLM2_GGUF, "--base_model_id", BASE_MODEL_ID,
        "--train_file", str(args.data_dir / "train.jsonl"),
        "--validation_file", str(args.data_dir / "validation.jsonl"),
        "--max_eval_samples", str(args.validation_rows), "--method", method, "--lora_r", "8", "--lora_alpha", "16",
        "--lora_target_modules", args.lora_target_modules, "--lora_layers", layers,
        "--num_clients", str(args.clients), "--partition", "iid",
        "--num_rounds", str(args.rounds), "--local_steps", str(args.local_steps),
        "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(rate),
        "--lr_scheduler_type", "constant", "--max_length", str(args.max_length),
        "--max_new_tokens", str(args.max_new_tokens), "--generation_batch_size", "50",
        "--per_device_eval_batch_size", "10", "--evaluate_before_training", "false", "--check_plain_peft", "false",
        "--eval_mode", "short_answer", "--seed", str(args.seed), "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--save_strategy", "no", "--logging_strategy", "no", "--output_dir", output_dir,
    ]  # fmt: skip
    if epsilon is not None:
        flags += ["--dp_target_epsilon", str(epsilon), "--dp_target_delta", str(args.delta)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), *flags], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} eps {epsilon} rate {rate} failed:\n{done.stderr[-3000:]}")
    results = json.loads((Path(output_dir) / "all_results.json").read_text())
    return {
        "rate": rate,
        "validation_exact_match": results["eval_exact_match"],
        "validation_named_choice_match": results.get("eval_named_choice_match"),
        "validation_loss": results["eval_loss"],
        "epsilon_spent": results.get("epsilon"),
        "wall_seconds": results["wall_seconds"],
        "peak_rss_mib": results["peak_rss_mib"],
    }


def score(script, adapter_dir: str | None, args) -> dict[str, Any]:
    """The test rows, scored once: the adapter in `adapter_dir` on a fresh base, or the base model alone."""
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoTokenizer, Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from hf_fedlora.instruction_data import (
        InstructionDataCollator,
        generate_completions,
        named_choice_match,
        normalize_answer,
        short_answer_match,
        tokenize_instructions,
    )

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    test = load_dataset("json", data_files=str(args.data_dir / "test.jsonl"), split="train")
    test = script.to_messages(test.select(range(min(args.test_rows, len(test)))), None)
    prompts, references = script.prompts_and_references(test, tokenizer)
    model_args = script.ModelArguments(
        model_name_or_path=smollm2_folder(), gguf_file=SMOLLM2_GGUF, base_model_id=BASE_MODEL_ID
    )
    model = script.load_base(model_args)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                per_device_eval_batch_size=10,
                use_cpu=True,
                report_to=[],
                disable_tqdm=True,
                prediction_loss_only=True,
            ),
            data_collator=InstructionDataCollator(tokenizer),
        )
        trainer.remove_callback(PrinterCallback)
        loss = trainer.evaluate(tokenize_instructions(test, tokenizer, max_length=args.max_length))["eval_loss"]
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=50)
    majority = Counter(normalize_answer(r) for r in references).most_common(1)[0][1] / len(references)
    answered = Counter(normalize_answer(c) for c in completions).most_common(1)[0]
    return {
        "test_exact_match": short_answer_match(completions, references),
        "test_named_choice_match": named_choice_match(completions, references),
        "test_loss": loss,
        "test_majority_share": majority,
        "test_top_answer": {"answer": answered[0], "share": answered[1] / len(completions)},
        "test_samples": [
            {"reference": r, "completion": c} for r, c in list(zip(references, completions, strict=True))[:5]
        ],
        "test_rows": len(references),
        "score_seconds": time.perf_counter() - start,
    }


def run_cell(script, method: str, epsilon: float | None, args) -> dict[str, Any]:
    """Every rate on the validation rows; the chosen one on the test rows."""
    with tempfile.TemporaryDirectory() as workdir:
        tried = []
        for rate in args.rates[method]:
            output_dir = os.path.join(workdir, f"rate_{rate:g}")
            tried.append(train(method, epsilon, rate, output_dir, args) | {"output_dir": output_dir})
            print(f"  {method} eps {epsilon} rate {rate:g}: validation {tried[-1]['validation_exact_match']:.3f}")
        chosen = max(tried, key=lambda t: (t["validation_exact_match"], -t["validation_loss"]))
        result = {} if args.validation_only else score(script, chosen["output_dir"], args)
    for run in tried:
        run.pop("output_dir")
    return {**{k: v for k, v in chosen.items() if k != "output_dir"}, **result, "rates_tried": tried}


def cell_key(run: dict[str, Any]) -> tuple:
    return run["method"], run["epsilon"]


def write_markdown(name: str, runs: list[dict[str, Any]], args) -> str:
    rows = []
    for run in runs:
        private = "non-private" if run["epsilon"] is None else f"({run['epsilon']:g}, {args.delta:g})"
        rows.append(
            [
                run["method"], private, run.get("rate"), run["test_exact_match"], run["test_named_choice_match"],
                run["test_loss"], run.get("epsilon_spent"), run.get("wall_seconds"), run.get("peak_rss_mib"),
            ]
        )  # fmt: skip
    headers = ["method", "DP", "rate", "exact match", "named first", "answer loss", "eps spent", "wall s", "peak MiB"]
    majority = runs[0]["test_majority_share"] if runs else float("nan")
    text = (
        f"# {name}\n\n{format_table(headers, rows)}\n\nAlways the majority label: exact match {majority:.3f}. "
        f"Budget: {args.clients} clients x {args.rounds} rounds x {args.local_steps} local steps x batch "
        f"{args.batch_size}; LoRA r=8 on {args.lora_target_modules} of the upper {args.lora_layers} layers.\n"
    )
    (RESULTS_DIR / f"{name}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    script = load_script()
    path = RESULTS_DIR / f"{args.name}.json"
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if args.resume and path.exists() else []
    done = {cell_key(run) for run in runs}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if ("base", None) not in done and not (args.no_base or args.validation_only):
        runs.append({"method": "base", "epsilon": None, **score(script, None, args)})
        print(f"base zero-shot: test exact match {runs[-1]['test_exact_match']:.3f}", flush=True)
        write_results(args.name, {"settings": settings, "runs": runs})
    for method in args.methods:
        for epsilon in args.epsilons:
            if (method, epsilon) in done:
                continue
            result = run_cell(script, method, epsilon, args)
            runs.append({"method": method, "epsilon": epsilon, **result})
            if not args.validation_only:
                print(
                    f"{method} eps {epsilon}: rate {result['rate']:g} test exact match "
                    f"{result['test_exact_match']:.3f} named {result['test_named_choice_match']:.3f} "
                    f"spent {result['epsilon_spent']}",
                    flush=True,
                )
            write_results(args.name, {"settings": settings, "runs": runs})
    if not args.validation_only:
        print(write_markdown(args.name, runs, args))


if __name__ == "__main__":
    main()
