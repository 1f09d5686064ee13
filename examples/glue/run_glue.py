#!/usr/bin/env python
"""Federated, differentially private LoRA fine-tuning of a text classifier on GLUE (or your own CSV/JSON).

Shaped like transformers' `examples/pytorch/text-classification/run_glue.py`: every field of
`ModelArguments`, `DataTrainingArguments` and `FederatedTrainingArguments` is a flag, or pass one JSON
file holding them all. The training set is split among simulated clients (`--num_clients`,
`--partition`), each client runs DP-SGD on its own shard when `--dp_target_epsilon` is set, and the
server aggregates as the `--method` says. The global adapter is saved in plain PEFT format.

    python run_glue.py --model_name_or_path roberta-base --task_name sst2 --method ffa_lora \
        --num_clients 3 --num_rounds 10 --dp_target_epsilon 3 --output_dir runs/sst2
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import transformers
from datasets import DatasetDict, load_dataset
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    default_data_collator,
    set_seed,
)

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, methods
from hf_fedlora.hub import format_delta, format_epsilon
from hf_fedlora.metrics import load_glue_metric
from hf_fedlora.models import POOLINGS, load_sequence_classifier, sequence_classifier_class
from hf_fedlora.recipe import apply_dp_recipe

logger = logging.getLogger(__name__)

GLUE_HUB_ID = "nyu-mll/glue"
NEW_LABEL = "_label_id"
task_to_keys = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# Attention projections that LoRA adapts by default (the LoRA and FFA-LoRA papers adapt query and value).
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def method_names() -> list[str]:
    """The federated methods this hf_fedlora knows (whatever is registered when the script runs)."""
    return [config_cls.method_class.name for config_cls in methods.CONFIG_CLASSES]


@dataclass
class ModelArguments:
    """The base model, and the federated LoRA method and adapter to train on it."""

    model_name_or_path: str = field(metadata={"help": "Hub model id or local folder of the base model."})
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the Hub (read it first)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a checkpoint's classification head of another size."}
    )
    method: str = field(
        default="ffa_lora",
        metadata={"help": "Federated LoRA method: the name of a registered hf_fedlora method (ffa_lora, lora, ...)."},
    )
    method_kwargs: str | None = field(
        default=None,
        metadata={"help": "JSON object of extra fields for the method's config class, e.g. '{\"init_seed\": 1}'."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to adapt. Default per model type: query,value for "
            "BERT/RoBERTa-like models (q_lin,v_lin for DistilBERT, query_proj,value_proj for DeBERTa-v2)."
        },
    )

    pooling: str | None = field(
        default=None,
        metadata={
            "help": "What the classifier head reads: 'mean' (masked mean over tokens), 'cls' (the first token's state) "
            "or 'pooler' (the checkpoint's own head: BertForSequenceClassification's pooler). Default: 'mean' under "
            "the DP recipe, else 'pooler'. 'mean' and 'cls' exist for BERT- and RoBERTa-like checkpoints.",
            "choices": list(POOLINGS),
        },
    )
    dropout: float | None = field(
        default=None,
        metadata={
            "help": "The encoder's hidden and attention dropout. Default: 0 under the DP recipe, else the checkpoint's."
        },
    )
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated layer indices that get LoRA (PEFT's layers_to_transform), e.g. '3,4,5'. "
            "Default: the upper half under the DP recipe, else every layer."
        },
    )
    dp_recipe: bool | None = field(
        default=None,
        metadata={
            "help": "Fill every setting you did not give from hf_fedlora's DP recipe (hf_fedlora.recipe): logical "
            "batch, rounds, local steps, learning rate, partition_min_size, pooling, dropout, LoRA layers and the "
            "method's settings, derived from the clients' sizes; it prints each choice. Default: on under "
            "example-level DP, off otherwise."
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
    """What data to train and evaluate on: a GLUE task from the Hub, or local CSV/JSON files."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"GLUE task: one of {sorted(task_to_keys)}. Loaded from the Hub ({GLUE_HUB_ID}) unless "
            "--train_file is given, in which case the files hold the task's columns."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .csv or .json(l) file."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data, same format and columns."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after tokenization (truncation)."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every example to max_seq_length (default: pad each batch dynamically)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})

    def __post_init__(self) -> None:
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            if self.task_name not in task_to_keys:
                raise ValueError(
                    f"--task_name {self.task_name!r} is not a GLUE task; use one of {sorted(task_to_keys)}"
                )
        if self.task_name is None and self.train_file is None:
            raise ValueError("Give a GLUE task with --task_name, or your own data with --train_file")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"--{name} must be a .csv, .json or .jsonl file, got {path!r}")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file (a GLUE task brings its own validation set)")


def parse_args(
    args: list[str] | None,
) -> tuple[ModelArguments, DataTrainingArguments, FederatedTrainingArguments, set[str]]:
    """Flags, or one JSON file of all the arguments (as transformers' examples accept); and the names of the fields
    given (the DP recipe fills only the others)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FederatedTrainingArguments))
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith(".json"):
        path = os.path.abspath(args[0])
        with open(path, encoding="utf-8") as file:
            given = set(json.load(file))
        return (*parser.parse_json_file(json_file=path), given)
    given = {token[2:].split("=", 1)[0].replace("-", "_") for token in args if token.startswith("--")}
    return (*parser.parse_args_into_dataclasses(args=args), given)


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> tuple[DatasetDict, str | None]:
    """(splits with "train" and maybe "validation", name of the extra MNLI mismatched split or None)."""
    if data_args.train_file is None:  # a GLUE task from the Hub
        raw = load_dataset(GLUE_HUB_ID, data_args.task_name, cache_dir=model_args.cache_dir, token=model_args.token)
        if data_args.task_name == "mnli":
            splits = {
                "train": raw["train"],
                "validation": raw["validation_matched"],
                "validation_mismatched": raw["validation_mismatched"],
            }
            return DatasetDict(splits), "validation_mismatched"
        return DatasetDict({"train": raw["train"], "validation": raw["validation"]}), None
    files = {"train": data_args.train_file, "validation": data_args.validation_file}
    splits = {}
    for split, path in files.items():  # one load per file, so a file with other columns gets our own message
        if path is not None:
            builder = "csv" if path.endswith(".csv") else "json"
            splits[split] = load_dataset(builder, data_files={split: path}, split=split, cache_dir=model_args.cache_dir)
    return DatasetDict(splits), None


def sentence_keys(data_args: DataTrainingArguments, columns: list[str]) -> tuple[str, str | None]:
    """The text column(s): the GLUE task's, else a GLUE-style pair found in the files, else the first columns."""
    if data_args.task_name is not None:
        keys = task_to_keys[data_args.task_name]
        missing = [key for key in keys if key is not None and key not in columns]
        if missing:
            raise ValueError(f"--task_name {data_args.task_name} needs columns {missing}; the data has {columns}")
        return keys
    for first, second in task_to_keys.values():
        if second is not None and first in columns and second in columns:
            return first, second
    for single in ("sentence", "text"):
        if single in columns:
            return single, None
    text_columns = [name for name in columns if name != "label"]
    if not text_columns:
        raise ValueError(f"--train_file has no text column besides 'label': columns are {columns}")
    return text_columns[0], (text_columns[1] if len(text_columns) > 1 else None)


def label_info(raw: DatasetDict, data_args: DataTrainingArguments) -> tuple[bool, list[Any] | None]:
    """(is regression, sorted label values or names) after checking the label column of every split."""
    source = {"train": "--train_file", "validation": "--validation_file"}
    for split, data in raw.items():
        if "label" not in data.column_names:
            where = source.get(split, split) if data_args.train_file else f"GLUE split {split}"
            raise ValueError(f"{where} has no 'label' column: its columns are {data.column_names}")
    feature = raw["train"].features["label"]
    if data_args.task_name is not None:
        regression = data_args.task_name == "stsb"
    else:
        regression = getattr(feature, "dtype", None) in ("float32", "float64")
    if regression:
        return True, None
    if hasattr(feature, "names"):  # a ClassLabel (GLUE from the Hub): ids already
        return False, list(feature.names)
    labels = sorted(raw["train"].unique("label"))
    for split, data in raw.items():
        if split == "train":
            continue
        unseen = sorted(set(data.unique("label")) - set(labels) - {-1})
        if unseen:
            raise ValueError(
                f"{source.get(split, split)} has labels {unseen} that --train_file does not have (training labels: "
                f"{labels}); the model can only predict labels it was trained on"
            )
    return False, labels


def target_modules(model_args: ModelArguments, model_type: str) -> list[str]:
    if model_args.lora_target_modules:
        return [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default LoRA target modules for model type {model_type!r}: set --lora_target_modules, e.g. "
            "the attention query and value projections' names"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def privacy_metrics(trainer: FederatedTrainer) -> dict[str, Any]:
    """The guarantee behind the epsilon: delta, unit and accountant (an epsilon alone means little)."""
    report = trainer.privacy_report()
    if not report["private"]:
        print("Privacy: none. This run was not differentially private.")
        return {"private": False}
    print(
        f"Privacy: ({format_epsilon(report['epsilon'])}, {format_delta(report['delta'])})-DP per {report['unit']}, "
        "the largest epsilon "
        f"over clients ({report['accountant'].upper()} accountant, clip norm {report['clip_norm']})"
    )
    return {key: report[key] for key in ("private", "epsilon", "delta", "unit", "accountant")}


def main(args: list[str] | None = None) -> FederatedTrainer:
    model_args, data_args, training_args, given = parse_args(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    if training_args.client_column is not None and training_args.partition == "iid":
        training_args.partition = "column"  # a natural client id: one client per value
    set_seed(training_args.seed)  # the fresh classification head is drawn from it

    # Data, checked before anything is built or trained.
    raw, extra_split = load_raw_datasets(data_args, model_args)
    is_regression, label_list = label_info(raw, data_args)
    sentence1_key, sentence2_key = sentence_keys(data_args, raw["train"].column_names)
    num_labels = 1 if is_regression else len(label_list)
    if not is_regression and num_labels < 2:
        raise ValueError(f"--train_file has a single label {label_list}: classification needs at least two")

    # Config and tokenizer; the model is built once the DP recipe (if any) has chosen its settings.
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=num_labels,
        finetuning_task=data_args.task_name,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    if not is_regression:
        config.label2id = {str(label): i for i, label in enumerate(label_list)}
        config.id2label = {i: str(label) for i, label in enumerate(label_list)}
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    # Tokenize; labels of local files become ids in the sorted order of the training labels.
    padding = "max_length" if data_args.pad_to_max_length else False
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    label_to_id = None if is_regression or data_args.train_file is None else {v: i for i, v in enumerate(label_list)}

    def preprocess(examples: dict[str, list]) -> dict[str, list]:
        texts = [examples[sentence1_key]] + ([examples[sentence2_key]] if sentence2_key is not None else [])
        result = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
        if is_regression:
            result[NEW_LABEL] = [float(label) for label in examples["label"]]
        elif label_to_id is not None:
            result[NEW_LABEL] = [label_to_id[label] if label != -1 else -1 for label in examples["label"]]
        else:  # GLUE's ClassLabel ids already
            result[NEW_LABEL] = list(examples["label"])
        return result

    # The label column is rebuilt under another name: datasets casts a returned column back to the input's type
    # (a file's string labels would stay strings).
    processed = raw.map(preprocess, batched=True, desc="Tokenizing", remove_columns=["label"])
    processed = processed.rename_column(NEW_LABEL, "label")
    train_dataset = processed["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    eval_dataset = processed.get("validation")
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    # The DP recipe: every setting not given, from the clients' sizes (the split the trainer will make).
    recipe = None
    if model_args.dp_recipe or (
        model_args.dp_recipe is None and training_args.private and training_args.dp_unit == "example"
    ):
        recipe, training_args = apply_dp_recipe(
            training_args,
            train_dataset,
            model_args.method,
            num_hidden_layers=getattr(config, "num_hidden_layers", None),
            model_type=config.model_type,
            keep=sorted(given),
        )
        print(recipe.describe())
    pooling = model_args.pooling or (recipe.pooling if recipe else "pooler")
    sequence_classifier_class(config.model_type, pooling)  # an unsupported --pooling fails here, before training
    dropout = model_args.dropout if model_args.dropout is not None else (recipe.dropout if recipe else None)
    if model_args.lora_layers is not None:
        layers = [int(i) for i in model_args.lora_layers.split(",") if i.strip()]
    else:
        layers = list(recipe.lora_layers) if recipe and recipe.lora_layers is not None else None

    # Model and the federated LoRA adapter.
    model = load_sequence_classifier(
        model_args.model_name_or_path,
        pooling=pooling,
        dropout=dropout,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    config_cls = methods.config_class_for(model_args.method)
    method_kwargs = {
        **(recipe.method_settings if recipe else {}),
        **(json.loads(model_args.method_kwargs) if model_args.method_kwargs else {}),
    }
    try:
        peft_config = config_cls(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=target_modules(model_args, config.model_type),
            layers_to_transform=layers,
            task_type="SEQ_CLS",  # PEFT then trains and saves the classification head too
            **method_kwargs,
        )
    except TypeError as error:
        raise ValueError(f"--method_kwargs: {config_cls.__name__} does not take these fields: {error}") from error
    model = get_peft_model(model, peft_config)

    metric = load_glue_metric(data_args.task_name or ("regression" if is_regression else "classification"))

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        predictions = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(predictions) if is_regression else np.argmax(predictions, axis=1)
        result = metric.compute(predictions=predictions, references=prediction.label_ids)
        if data_args.task_name is not None and len(result) > 1:  # GLUE's score for MRPC, QQP and STS-B
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    trainer = FederatedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics if eval_dataset is not None else None,
    )

    train_result = trainer.train()
    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", {**metrics, **privacy_metrics(trainer)})  # printed in full, not rounded
    if eval_dataset is not None:
        evaluations = [("eval", eval_dataset)]
        if extra_split is not None:
            evaluations.append(("eval_mismatched", processed[extra_split]))
        for prefix, dataset in evaluations:
            eval_metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)
            eval_metrics[f"{prefix}_samples"] = len(dataset)
            trainer.log_metrics(prefix, eval_metrics)
            trainer.save_metrics(prefix, eval_metrics)

    model_name = os.path.basename(os.path.normpath(training_args.output_dir))
    dataset_name = f"GLUE {data_args.task_name.upper()}" if data_args.task_name and not data_args.train_file else None
    trainer.create_model_card(model_name=model_name, dataset_name=dataset_name, tags=["text-classification"])
    trainer.save_model()  # the adapter, its card and the federated record; also pushes with --push_to_hub
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
