#!/usr/bin/env python
"""Federated, differentially private instruction tuning of a causal LM (GSM8K, Alpaca-style data, or your JSON/JSONL).

Every field of `ModelArguments`, `DataTrainingArguments` and `FederatedTrainingArguments` is a flag (or pass one
JSON file holding them all). The training set is split among simulated clients (`--num_clients`), each client
runs DP-SGD on its own shard when `--dp_target_epsilon` is set (each example's loss is the mean over its own
answer tokens; prompt tokens are masked), and the server aggregates as `--method` says. Evaluation: exact match
of the final answer (`#### n`, greedy generation with the global adapter) for GSM8K-style data, and the loss and
perplexity on the answer tokens; both before and after training. The global adapter is saved in plain PEFT format.

    python run_instruction_tuning.py --model_name_or_path meta-llama/Llama-3.2-1B-Instruct \
        --dataset_name openai/gsm8k --dataset_config_name main --method ffa_lora \
        --num_clients 3 --num_rounds 10 --dp_target_epsilon 6 --output_dir runs/gsm8k
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import datasets
import transformers
from datasets import Dataset, load_dataset
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, HfArgumentParser, set_seed

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, methods
from hf_fedlora.instruction_data import (
    COMPLETION,
    MESSAGES,
    PROMPT,
    InstructionDataCollator,
    exact_match,
    final_answer,
    generate_completions,
    named_choice_match,
    normalize_answer,
    short_answer_match,
    tokenize_instructions,
)

logger = logging.getLogger(__name__)
EVAL_MODES = ("auto", "exact_match", "short_answer", "loss")
MAX_CHOICES = 20  # short answers with at most this many distinct values are a closed set (labels)
SHORT_ANSWER_WORDS = 5  # auto: references of one line and at most this many words are scored as short answers


def method_names() -> list[str]:
    """The federated methods this hf_fedlora knows (whatever is registered when the script runs)."""
    return [config_cls.method_class.name for config_cls in methods.CONFIG_CLASSES]


@dataclass
class ModelArguments:
    """The base causal LM, and the federated LoRA method and adapter to train on it."""

    model_name_or_path: str = field(metadata={"help": "Hub model id or local folder of the base model."})
    gguf_file: str | None = field(
        default=None,
        metadata={
            "help": "A GGUF file inside model_name_or_path (needs `pip install gguf`); transformers dequantises it "
            "to fp32. Then --base_model_id is required."
        },
    )
    base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model, written into adapter_config.json so others can load the adapter "
            "(default: model_name_or_path). Required with --gguf_file: a GGUF-loaded model is not a Hub checkpoint."
        },
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    method: str = field(
        default="ffa_lora",
        metadata={"help": "Federated LoRA method, one of the registered ones (hf_fedlora.methods.CONFIG_CLASSES)."},
    )
    method_kwargs: str | None = field(
        default=None, metadata={"help": "JSON object of extra fields for the method's config class."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names to adapt. Default: PEFT's per-model default (q/v proj)."},
    )
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated indices of the layers that get LoRA (PEFT's layers_to_transform), e.g. the "
            "upper ones: '22,23,24,25,26,27,28,29' of SmolLM2's 30. Nothing below the lowest adapted layer needs a "
            "backward pass: 1.57x the examples per second of every layer (benchmarks/RESULTS.md#throughput-causal-lm). "
            "Default: every layer."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_layers is not None:
            try:
                [int(i) for i in self.lora_layers.split(",") if i.strip()]
            except ValueError:
                raise ValueError(f"--lora_layers must be comma-separated integers, got {self.lora_layers!r}") from None
        if self.method not in method_names():
            raise ValueError(
                f"--method {self.method!r} is not a registered hf_fedlora method; use one of {method_names()}"
            )
        if self.gguf_file is not None and self.base_model_id is None:
            raise ValueError(
                "--gguf_file needs --base_model_id (e.g. HuggingFaceTB/SmolLM2-135M-Instruct): the adapter config "
                "must name a base model others can download, not this local GGUF file"
            )
        if self.method_kwargs is not None:
            try:
                kwargs = json.loads(self.method_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"--method_kwargs must be a JSON object, got {self.method_kwargs!r}: {error}"
                ) from error
            if not isinstance(kwargs, dict):
                raise ValueError(f"--method_kwargs must be a JSON object, got {self.method_kwargs!r}")


@dataclass
class DataTrainingArguments:
    """Instruction data: a Hub dataset (GSM8K, Alpaca-style) or local JSON/JSONL files, and how to evaluate."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. openai/gsm8k."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. main."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default="test", metadata={"help": "Split to evaluate on (none: no evaluation)."})
    train_file: str | None = field(default=None, metadata={"help": "Local JSON/JSONL training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local JSON/JSONL evaluation file."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message put before every question (chat templates only)."}
    )
    max_length: int = field(default=512, metadata={"help": "Longest tokenised example; longer ones are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})
    eval_mode: str = field(
        default="auto",
        metadata={
            "help": f"One of {EVAL_MODES}. exact_match: generate and compare the final answer (`#### n`) and also "
            "report the answer-token loss; short_answer: generate and compare the answer's first line as text "
            "(lower-cased, edge punctuation dropped), and when the answers come from a closed set also the first "
            "of them the generation names; loss: loss and perplexity only; auto: exact_match when the references "
            f"hold `####` answers, short_answer when each is one line of at most {SHORT_ANSWER_WORDS} words."
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length for exact match."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    evaluate_before_training: bool = field(default=True, metadata={"help": "Also evaluate the base model first."})
    check_plain_peft: bool = field(
        default=True,
        metadata={"help": "After saving, load the adapter with plain peft on a fresh base model and generate."},
    )

    def __post_init__(self) -> None:
        if (self.dataset_name is None) == (self.train_file is None):
            raise ValueError("Give either --dataset_name (a Hub dataset) or --train_file (local JSON/JSONL), not both")
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"--eval_mode must be one of {list(EVAL_MODES)}, got {self.eval_mode!r}")


def parse_args(args: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FederatedTrainingArguments))
    if args is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=args)


# ----------------------------------------------------------------------------------------
# Data: any supported layout -> prompt/completion -> messages (with a chat template)
# ----------------------------------------------------------------------------------------
def load_raw(data_args: DataTrainingArguments) -> tuple[Dataset, Dataset | None]:
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        train = raw[data_args.train_split]
        evaluation = raw[data_args.eval_split] if data_args.eval_split and data_args.eval_split in raw else None
    else:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        raw = load_dataset("json", data_files=files)
        train, evaluation = raw["train"], raw.get("validation")
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    return train, evaluation


def to_prompt_completion(data: Dataset) -> Dataset:
    """GSM8K (question/answer) and Alpaca (instruction/input/output) become prompt/completion; messages and
    prompt/completion pass through."""
    columns = set(data.column_names)
    if MESSAGES in columns or {PROMPT, COMPLETION} <= columns:
        return data
    if {"question", "answer"} <= columns:
        return data.rename_columns({"question": PROMPT, "answer": COMPLETION})
    if {"instruction", "output"} <= columns:

        def alpaca(row: dict[str, Any]) -> dict[str, str]:
            extra = (row.get("input") or "").strip()
            return {PROMPT: row["instruction"] + (f"\n\n{extra}" if extra else ""), COMPLETION: row["output"]}

        return data.map(alpaca, remove_columns=data.column_names)
    raise ValueError(
        f"Cannot tell the prompt from the answer in columns {sorted(columns)}: give 'messages' (chat), "
        "'prompt'/'completion', 'question'/'answer' (GSM8K) or 'instruction'/'input'/'output' (Alpaca)"
    )


def to_messages(data: Dataset, system_prompt: str | None) -> Dataset:
    """Plain prompt/completion rows as a conversation, so the model sees its chat template in training and eval."""
    if MESSAGES in data.column_names:
        return data

    def chat(row: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        turns = [{"role": "user", "content": row[PROMPT]}, {"role": "assistant", "content": row[COMPLETION]}]
        return {MESSAGES: system + turns}

    return data.map(chat, remove_columns=data.column_names)


def prompts_and_references(data: Dataset, tokenizer) -> tuple[list[str], list[str]]:
    """What generation is given (everything before the last answer, as in training) and the reference answer."""
    if MESSAGES in data.column_names:
        prompts = [
            tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True) for m in data[MESSAGES]
        ]
        return prompts, [m[-1]["content"] for m in data[MESSAGES]]
    return list(data[PROMPT]), list(data[COMPLETION])


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def load_base(model_args: ModelArguments):
    """The base model; a GGUF file is unpacked into a plain dense model (GgufConfig(dequantize=True)): transformers'
    Trainer refuses to train a model that still counts as GGUF-quantized."""
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.gguf_file is not None:
        kwargs["gguf_file"] = model_args.gguf_file
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)


def evaluate(trainer: FederatedTrainer, tokenized: Dataset, prompts, references, data_args, mode: str, prefix: str):
    """Answer-token loss and perplexity of the current (global) adapter; exact match (numbers after `####`, or
    short answers as text) by greedy generation."""
    metrics = trainer.evaluate(eval_dataset=tokenized, metric_key_prefix=prefix)
    metrics[f"{prefix}_perplexity"] = math.exp(metrics[f"{prefix}_loss"])
    if mode not in ("exact_match", "short_answer"):
        return metrics, None
    start = time.time()
    completions = generate_completions(
        trainer.model,
        trainer.processing_class,
        prompts,
        max_new_tokens=data_args.max_new_tokens,
        batch_size=data_args.generation_batch_size,
    )
    metrics[f"{prefix}_generation_seconds"] = time.time() - start
    if mode == "exact_match":
        metrics[f"{prefix}_exact_match"] = exact_match(completions, references)
    else:
        metrics[f"{prefix}_exact_match"] = short_answer_match(completions, references)
        if len({normalize_answer(r) for r in references}) <= MAX_CHOICES:
            metrics[f"{prefix}_named_choice_match"] = named_choice_match(completions, references)
    return metrics, completions


def eval_mode_for(references: list[str], requested: str) -> str:
    """`auto`: exact_match for `#### n` answers, short_answer for one-line answers of a few words, else loss."""
    if requested != "auto":
        return requested
    if references and all("####" in r for r in references):
        return "exact_match"
    if references and all(
        len(r.strip().splitlines()) == 1 and len(r.split()) <= SHORT_ANSWER_WORDS for r in references
    ):
        return "short_answer"
    return "loss"


def main(args: list[str] | None = None) -> FederatedTrainer:
    model_args, data_args, training_args = parse_args(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    set_seed(training_args.seed)
    started = time.time()

    # Tokenizer and data, checked before the model is loaded or anything is trained.
    tokenizer_kwargs = {"trust_remote_code": model_args.trust_remote_code}
    if model_args.gguf_file is not None and model_args.tokenizer_name is None:
        tokenizer_kwargs["gguf_file"] = model_args.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, **tokenizer_kwargs
    )
    collator = InstructionDataCollator(tokenizer)  # refuses a tokenizer without a pad token, saying how to set one
    train_raw, eval_raw = load_raw(data_args)
    chat = getattr(tokenizer, "chat_template", None) is not None
    shaped = [to_prompt_completion(d) for d in (train_raw, eval_raw) if d is not None]
    if chat:
        shaped = [to_messages(d, data_args.system_prompt) for d in shaped]
    train_data, eval_data = shaped[0], (shaped[1] if len(shaped) > 1 else None)
    train_tokenized = tokenize_instructions(train_data, tokenizer, max_length=data_args.max_length)
    eval_tokenized = (
        tokenize_instructions(eval_data, tokenizer, max_length=data_args.max_length) if eval_data is not None else None
    )
    prompts, references = prompts_and_references(eval_data, tokenizer) if eval_data is not None else ([], [])
    mode = eval_mode_for(references, data_args.eval_mode)

    # Model and the federated adapter.
    model = load_base(model_args)
    config_cls = methods.config_class_for(model_args.method)
    method_kwargs = json.loads(model_args.method_kwargs) if model_args.method_kwargs else {}
    targets = model_args.lora_target_modules.split(",") if model_args.lora_target_modules else None
    layers = [int(i) for i in model_args.lora_layers.split(",") if i.strip()] if model_args.lora_layers else None
    depth = getattr(model.config, "num_hidden_layers", None)
    if layers is not None and depth is not None and not all(0 <= i < depth for i in layers):
        raise ValueError(f"--lora_layers {model_args.lora_layers!r}: the model has layers 0-{depth - 1}")
    try:
        peft_config = config_cls(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets,
            layers_to_transform=layers,
            task_type="CAUSAL_LM",
            **method_kwargs,
        )
    except TypeError as error:
        raise ValueError(f"--method_kwargs: {config_cls.__name__} does not take these fields: {error}") from error
    model = get_peft_model(model, peft_config)
    # What adapter_config.json names as the base: a Hub id, not a local GGUF folder.
    model.peft_config[model.active_adapter].base_model_name_or_path = (
        model_args.base_model_id or model_args.model_name_or_path
    )

    training_args.prediction_loss_only = True  # evaluation needs the loss only; generation is separate
    trainer = FederatedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_tokenized,
        data_collator=collator,
        processing_class=tokenizer,
    )
    results: dict[str, Any] = {"eval_mode": mode, "num_eval_examples": len(references)}
    completions_before = None
    if eval_tokenized is not None and data_args.evaluate_before_training:
        before, completions_before = evaluate(trainer, eval_tokenized, prompts, references, data_args, mode, "before")
        results.update(before)
        logger.warning(f"Before training: {before}")

    train_result = trainer.train()
    trainer.save_model()
    # Under DP the training losses stay on the clients (not covered by the guarantee): train_loss is then NaN.
    results.update({k if k.startswith("train_") else f"train_{k}": v for k, v in train_result.metrics.items()})
    if trainer.privacy.enabled:
        report = trainer.privacy_report()
        results.update(
            epsilon=report["epsilon"], delta=report["delta"], dp_unit=report["unit"], accountant=report["accountant"]
        )
    completions = None
    if eval_tokenized is not None:
        after, completions = evaluate(trainer, eval_tokenized, prompts, references, data_args, mode, "eval")
        results.update(after)

    if data_args.check_plain_peft and training_args.should_save:
        # A fresh base model and plain peft: what anyone who downloads the adapter does.
        loaded = PeftModel.from_pretrained(load_base(model_args), training_args.output_dir)
        sample = prompts[:3] or [tokenizer.bos_token or ""]
        again = generate_completions(loaded, tokenizer, sample, max_new_tokens=min(data_args.max_new_tokens, 64))
        mine = generate_completions(trainer.model, tokenizer, sample, max_new_tokens=min(data_args.max_new_tokens, 64))
        results["plain_peft_generations_match"] = again == mine
        results["plain_peft_sample"] = [{"prompt": p, "completion": c} for p, c in zip(sample, again, strict=True)]
        del loaded

    results["num_clients"] = len(trainer.client_datasets)
    results["rounds"] = trainer.federation.rounds_done
    results["wall_seconds"] = time.time() - started
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    answer = final_answer if mode == "exact_match" else normalize_answer
    for key, generated in (("before_samples", completions_before), ("eval_samples", completions)):
        if generated is not None:
            results[key] = [
                {"reference": answer(r), "predicted": answer(c), "completion": c}
                for r, c in list(zip(references, generated, strict=True))[:5]
            ]
    if training_args.should_save:
        with open(os.path.join(training_args.output_dir, "all_results.json"), "w") as handle:
            json.dump(results, handle, indent=2, default=str)
    logger.warning(json.dumps({k: v for k, v in results.items() if not k.endswith("sample")}, default=str))
    trainer.instruction_results = results
    return trainer


if __name__ == "__main__":
    main()
