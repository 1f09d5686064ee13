#!/usr/bin/env python
"""Federated, differentially private LoRA fine-tuning of an image classifier (e.g. a ViT on medical images).

Shaped like transformers' `examples/pytorch/image-classification/run_image_classification.py`: any
`AutoModelForImageClassification` checkpoint (Hub id or local folder), and an image dataset from the Hub
(`--dataset_name`, e.g. a MedMNIST or Kvasir dataset) or a local image folder (`--train_dir`, one
sub-folder per class). Images are processed with PIL only (no torchvision). The training set is split
among simulated clients (`--num_clients` with `--partition`, or a natural client id with
`--client_column hospital_id`), each client runs DP-SGD on its own shard when `--dp_target_epsilon` is
set, and the global adapter (LoRA factors plus the classification head) is saved in plain PEFT format.

    python run_medical_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \
        --train_dir path/to/images --method ffa_lora --num_clients 12 --partition dirichlet \
        --dirichlet_alpha 0.1 --dp_target_epsilon 3 --output_dir runs/vit-med
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
import transformers
from datasets import DatasetDict, load_dataset
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    EvalPrediction,
    HfArgumentParser,
    PretrainedConfig,
    set_seed,
)

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments, methods
from hf_fedlora.hub import format_delta, format_epsilon
from hf_fedlora.metrics import load_glue_metric

logger = logging.getLogger(__name__)

# Attention projections LoRA adapts by default; transformers 5 names them q_proj / v_proj in these models.
DEFAULT_TARGET_MODULES = {
    "vit": ["q_proj", "v_proj"],
    "deit": ["q_proj", "v_proj"],
    "beit": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "swin": ["q_proj", "v_proj"],
}


# Model types that interpolate their position embeddings to any image size by themselves (--image_size).
INTERPOLATING_MODEL_TYPES = {"dinov2"}


def method_names() -> list[str]:
    """The federated methods this hf_fedlora knows (whatever is registered when the script runs)."""
    return [config_cls.method_class.name for config_cls in methods.CONFIG_CLASSES]


@dataclass
class ModelArguments:
    """The base image classifier, and the federated LoRA method and adapter to train on it."""

    model_name_or_path: str = field(
        default="google/vit-base-patch16-224-in21k",
        metadata={"help": "Hub id or local folder of an AutoModelForImageClassification checkpoint (ViT default)."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor name or path, if not the model's."}
    )
    image_processor_backend: str = field(
        default="pil",
        metadata={"help": "Image processor backend: 'pil' (no torchvision needed) or 'torchvision'."},
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Resize images to this side in pixels instead of the image processor's size: a multiple of the "
            "patch size, for models that interpolate their position embeddings (DINOv2). Smaller is cheaper."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are cached."})
    model_revision: str = field(default="main", metadata={"help": "Model version: branch, tag or commit id."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the Hub (read it first)."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Replace a checkpoint's classification head of another size (e.g. an ImageNet head)."},
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
            "help": "Comma-separated module names to adapt. Default: q_proj,v_proj for ViT, DeiT, BEiT, "
            "DINOv2 and Swin."
        },
    )
    lora_layers: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated indices of the layers LoRA adapts (PEFT's layers_to_transform), e.g. 9,10,11: "
            "with the upper layers only, no backward pass runs through the lower ones. Default: every layer."
        },
    )
    modules_to_save: str = field(
        default="classifier",
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter: the new head."},
    )

    def __post_init__(self) -> None:
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
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image_size must be a positive number of pixels, got {self.image_size}")
        if self.lora_layers is not None:
            try:
                layers = [int(index) for index in self.lora_layers.split(",") if index.strip()]
            except ValueError as error:
                raise ValueError(
                    f"--lora_layers takes layer indices such as 9,10,11, got {self.lora_layers!r}"
                ) from error
            if not layers or min(layers) < 0:
                raise ValueError(f"--lora_layers takes layer indices from 0, such as 9,10,11, got {self.lora_layers!r}")

    def layer_indices(self) -> list[int] | None:
        """--lora_layers as PEFT's layers_to_transform (None: every layer)."""
        if self.lora_layers is None:
            return None
        return sorted({int(index) for index in self.lora_layers.split(",") if index.strip()})


@dataclass
class DataTrainingArguments:
    """What images to train and evaluate on: a Hub dataset, or local image folders (one sub-folder per class)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. a MedMNIST dataset."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder for training: one folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Image folder for validation, same classes."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Share of the training images held out for validation when there is none."}
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation images."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("Give a Hub dataset with --dataset_name, or a local image folder with --train_dir")
        for name in ("train_dir", "validation_dir"):
            path = getattr(self, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"--{name} {path!r} is not a folder")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}")


def parse_args(args: list[str] | None) -> tuple[ModelArguments, DataTrainingArguments, FederatedTrainingArguments]:
    """Flags, or one JSON file of all the arguments (as transformers' examples accept)."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, FederatedTrainingArguments))
    args = list(sys.argv[1:] if args is None else args)
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(args[0]))
    return parser.parse_args_into_dataclasses(args=args)


def load_images(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    """Splits "train" and "validation" (held out from train when the data has no validation split)."""
    if data_args.dataset_name is None:  # a local image folder
        classes = sorted(e.name for e in os.scandir(data_args.train_dir) if e.is_dir() and not e.name.startswith("."))
        if len(classes) < 2:
            raise ValueError(
                f"--train_dir {data_args.train_dir} holds {len(classes)} class folder(s) {classes}: an image folder "
                "needs one sub-folder per class, and classification needs at least two classes"
            )
    if data_args.dataset_name is not None:
        dataset = load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    else:
        # Explicit file patterns, so class folders named "train" or "test" are not taken for splits.
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    if "validation" not in dataset:
        held_out = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset = DatasetDict({"train": held_out["train"], "validation": held_out["test"]})
    return DatasetDict({"train": dataset["train"], "validation": dataset["validation"]})


def check_columns_and_labels(dataset: DatasetDict, data_args: DataTrainingArguments) -> list[Any]:
    """The label values, in id order, after checking columns and classes: fails before any training."""
    where = f"--train_dir {data_args.train_dir}" if data_args.train_dir else f"--dataset_name {data_args.dataset_name}"
    for split, data in dataset.items():
        for column, flag in ((data_args.image_column_name, "image"), (data_args.label_column_name, "label")):
            if column not in data.column_names:
                hint = " (an image folder needs one sub-folder per class)" if data_args.train_dir else ""
                raise ValueError(
                    f"{where}: the {split} split has no column {column!r}{hint}; its columns are "
                    f"{data.column_names}. Set --{flag}_column_name."
                )
    feature = dataset["train"].features[data_args.label_column_name]
    labels = (
        list(range(len(feature.names)))
        if hasattr(feature, "names")
        else sorted(dataset["train"].unique(data_args.label_column_name))
    )
    names = list(feature.names) if hasattr(feature, "names") else [str(label) for label in labels]
    present = sorted(set(dataset["train"].unique(data_args.label_column_name)))
    if len(present) < 2:
        shown = [names[labels.index(value)] for value in present]
        raise ValueError(
            f"{where}: the training images hold a single class {shown}; classification needs at least two "
            "(an image folder needs one sub-folder per class)"
        )
    unseen = sorted(set(dataset["validation"].unique(data_args.label_column_name)) - set(present))
    if unseen:
        raise ValueError(
            f"The validation images have labels {unseen} that the training images do not have ({present}); "
            "the model can only predict classes it was trained on"
        )
    return labels


def target_modules(model_args: ModelArguments, model_type: str) -> list[str]:
    if model_args.lora_target_modules:
        return [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"No default LoRA target modules for model type {model_type!r}: set --lora_target_modules, e.g. "
            "the attention query and value projections' names"
        )
    return DEFAULT_TARGET_MODULES[model_type]


def check_model_arguments(model_args: ModelArguments, config: PretrainedConfig) -> None:
    """--image_size and --lora_layers against the model's configuration, before the model is loaded."""
    if model_args.image_size is not None:
        if config.model_type not in INTERPOLATING_MODEL_TYPES:
            raise ValueError(
                f"--image_size: {config.model_type} models take images of the size they were trained on "
                f"({getattr(config, 'image_size', '?')} px); only {sorted(INTERPOLATING_MODEL_TYPES)} interpolate "
                "their position embeddings to another size. Drop --image_size, or give an image processor of "
                "the model's size with --image_processor_name."
            )
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        if model_args.image_size % patch:
            raise ValueError(
                f"--image_size {model_args.image_size} is not a multiple of the model's patch size {patch}: use "
                f"e.g. {max(patch, model_args.image_size // patch * patch)}"
            )
    layers = model_args.layer_indices()
    num_layers = getattr(config, "num_hidden_layers", None)
    if layers is not None and num_layers is not None and max(layers) >= num_layers:
        raise ValueError(
            f"--lora_layers {model_args.lora_layers}: the model has {num_layers} layers, numbered 0 to {num_layers - 1}"
        )


def check_images(data: datasets.Dataset, image_column: str, read: Callable[[Any], Any], split: str) -> None:
    """Read and process every image once, so that a file the image processor cannot read fails here, named,
    before any training (rather than in the middle of a client's round)."""
    feature = data.features[image_column]
    raw = data.select_columns([image_column])
    if isinstance(feature, datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))  # open each file here, to name it
    for index, row in enumerate(raw):
        value = row[image_column]
        where = f"row {index}"
        try:
            if isinstance(feature, datasets.Image):
                where = value.get("path") or where
                value = PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            read(value)
        except Exception as error:
            raise ValueError(
                f"The {split} image {where} cannot be read by the image processor "
                f"({type(error).__name__}: {error}); remove or replace it"
            ) from error


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
    model_args, data_args, training_args = parse_args(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s")
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    if training_args.client_column is not None and training_args.partition == "iid":
        training_args.partition = "column"  # a natural client id (e.g. hospital): one client per value
    if training_args.label_column not in (None, data_args.label_column_name):
        raise ValueError(
            f"--label_column {training_args.label_column!r} and --label_column_name {data_args.label_column_name!r} "
            "differ: set --label_column_name only"
        )
    training_args.label_column = data_args.label_column_name  # the partition and histograms read it
    training_args.remove_unused_columns = False  # pixel_values are made on the fly from the image column
    set_seed(training_args.seed)  # the fresh classification head is drawn from it

    # Data, checked before anything is built or trained.
    dataset = load_images(data_args, model_args, training_args.seed)
    labels = check_columns_and_labels(dataset, data_args)
    if training_args.client_column is not None and training_args.client_column not in dataset["train"].column_names:
        raise ValueError(
            f"--client_column {training_args.client_column!r} is not a column of the training data: "
            f"{dataset['train'].column_names}"
        )
    feature = dataset["train"].features[data_args.label_column_name]
    names = list(feature.names) if hasattr(feature, "names") else [str(label) for label in labels]
    label_to_id = {label: i for i, label in enumerate(labels)}

    # Model configuration and image processor, checked with the images before the model is built.
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path,
        num_labels=len(labels),
        label2id={name: i for i, name in enumerate(names)},
        id2label=dict(enumerate(names)),
        finetuning_task="image-classification",
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
    )
    check_model_arguments(model_args, config)
    size = {"height": model_args.image_size, "width": model_args.image_size} if model_args.image_size else {}
    image_processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path,
        backend=model_args.image_processor_backend,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        **({"size": size} if size else {}),
    )

    # Images become pixel_values when read (each example on its own: no batch statistics).
    image_column, label_column = data_args.image_column_name, data_args.label_column_name
    color_mode = "RGB" if getattr(config, "num_channels", 3) == 3 else "L"

    def pixels(images: list[Any]) -> torch.Tensor:
        return image_processor([image.convert(color_mode) for image in images], return_tensors="pt")["pixel_values"]

    def to_pixels(batch: dict[str, list]) -> dict[str, Any]:
        if image_column not in batch:  # a column read without the images (labels for the partition)
            return batch
        batch["pixel_values"] = pixels(batch.pop(image_column))
        return batch

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([label_to_id[example[label_column]] for example in examples]),
        }

    train_dataset, eval_dataset = dataset["train"], dataset["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    for split, data in (("training", train_dataset), ("validation", eval_dataset)):
        check_images(data, image_column, lambda image: pixels([image]), split)
    train_dataset.set_transform(to_pixels)
    eval_dataset.set_transform(to_pixels)

    # The model and its federated LoRA adapter.
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        token=model_args.token,
        trust_remote_code=model_args.trust_remote_code,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
    )
    config_cls = methods.config_class_for(model_args.method)
    method_kwargs = json.loads(model_args.method_kwargs) if model_args.method_kwargs else {}
    try:
        peft_config = config_cls(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=target_modules(model_args, config.model_type),
            layers_to_transform=model_args.layer_indices(),
            modules_to_save=[name.strip() for name in model_args.modules_to_save.split(",") if name.strip()],
            **method_kwargs,
        )
    except TypeError as error:
        raise ValueError(f"--method_kwargs: {config_cls.__name__} does not take these fields: {error}") from error
    model = get_peft_model(model, peft_config)

    metric = load_glue_metric("classification")  # accuracy, macro-F1, Matthews correlation

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        return metric.compute(predictions=np.argmax(prediction.predictions, axis=1), references=prediction.label_ids)

    trainer = FederatedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=image_processor,
        data_collator=collate,
        compute_metrics=compute_metrics,
    )

    train_result = trainer.train()
    metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", {**metrics, **privacy_metrics(trainer)})  # printed in full, not rounded
    eval_metrics = trainer.evaluate()
    eval_metrics["eval_samples"] = len(eval_dataset)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)

    model_name = os.path.basename(os.path.normpath(training_args.output_dir))
    trainer.create_model_card(model_name=model_name, dataset_name=data_args.dataset_name, tags=["image-classification"])
    trainer.save_model()  # the adapter, its card and the federated record; also pushes with --push_to_hub
    trainer.save_state()
    return trainer


if __name__ == "__main__":
    main()
