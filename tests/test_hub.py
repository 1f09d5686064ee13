"""Sharing an adapter: the card states the guarantee the run has (or plainly that it has none), the upload sends
exactly the listed files, and the federated record comes back from a folder or from the Hub cache, offline."""

from __future__ import annotations

import copy
import json
import os
from unittest import mock

import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import filter_repo_objects
from tiny import fed_args, tiny_peft, toy_dataset
from toy_method import TOY_CITATION, ToyMethod, registered_toy

from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.hub import (
    CARD_NAME,
    FEDERATED_RECORD_NAME,
    build_model_card,
    format_delta,
    format_epsilon,
    load_federated_record,
    save_model_card,
    upload_files,
)

# What FederatedTrainer.federated_record() returns for a private 3-client FFA-LoRA run with evaluation.
PRIVATE_RECORD = {
    "method": {"method": "ffa_lora", "init_seed": 0},
    "base_model": "google-bert/bert-base-uncased",
    "task_type": "SEQ_CLS",
    "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "rounds": 2,
    "num_clients": 3,
    "clients_per_round": 3,
    "local_steps": None,
    "local_epochs": 1.0,
    "batch_size": 16,
    "learning_rate": 0.5,
    "aggregation_weights": "num_examples",
    "partition": {"scheme": "dirichlet", "seed": 42, "dirichlet_alpha": 0.5},
    "client_sizes": {"client_0": 812, "client_1": 455, "client_2": 1733},
    "client_label_histograms": {
        "client_0": {"0": 700, "1": 112},
        "client_1": {"0": 55, "1": 400},
        "client_2": {"0": 900, "1": 833},
    },
    "privacy": {
        "private": True,
        "unit": "example",
        "epsilon": 7.98123,
        "delta": 1e-05,
        "target_epsilon": 8.0,
        "accountant": "prv",
        "clip_norm": 1.0,
        "noise_calibration": "per_client",
        "clients": {
            "client_0": {
                "epsilon": 7.9612,
                "num_examples": 812,
                "noise_multiplier": 0.71234,
                "sample_rate": 16 / 812,
                "steps": 102,
                "history": [[0.71234, 16 / 812, 102]],
            },
            "client_1": {
                "epsilon": 7.98123,
                "num_examples": 455,
                "noise_multiplier": 0.8123,
                "sample_rate": 16 / 455,
                "steps": 58,
                "history": [[0.8123, 16 / 455, 58]],
            },
            "client_2": {
                "epsilon": 7.9,
                "num_examples": 1733,
                "noise_multiplier": 0.6,
                "sample_rate": 16 / 1733,
                "steps": 218,
                "history": [[0.6, 16 / 1733, 218]],
            },
        },
    },
    "round_history": [
        {
            "round": 1,
            "clients": 3,
            "train_loss": 0.6931,
            "epsilon": 5.512,
            "delta": 1e-05,
            "eval_loss": 0.61,
            "eval_accuracy": 0.71,
            "eval_runtime": 0.31,
            "eval_samples_per_second": 100.0,
        },
        {
            "round": 2,
            "clients": 3,
            "train_loss": 0.5912,
            "epsilon": 7.98123,
            "delta": 1e-05,
            "eval_loss": 0.52,
            "eval_accuracy": 0.78,
            "eval_runtime": 0.29,
            "eval_samples_per_second": 103.0,
        },
    ],
}


def non_private_record() -> dict:
    record = copy.deepcopy(PRIVATE_RECORD)
    record["method"]["method"] = "lora"
    record["privacy"] = {"private": False, "unit": None, "epsilon": None, "clients": {}}
    for entry in record["round_history"]:
        del entry["epsilon"], entry["delta"]
    return record


def front_matter(text: str) -> dict:
    """The card's YAML metadata, parsed independently of huggingface_hub."""
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def section(text: str, title: str) -> str:
    """The body of the card's `## title` section."""
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def table_row(text: str, first_cell: str) -> list[str]:
    """Cells of the markdown table row that starts with `first_cell` (fails if there is none or several)."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


# ----------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------
def test_epsilon_is_printed_rounded_up_and_delta_in_g_style():
    assert format_epsilon(7.98123) == "7.99"  # never print a smaller epsilon than the accountant's
    assert format_epsilon(2.991) == "3.00"
    assert format_epsilon(1.1) == "1.10"  # exact decimals do not spill over
    assert format_epsilon(3.0) == "3.00"
    assert format_delta(1e-5) == "1e-05"
    assert format_delta(2.5e-5) == "2.5e-05"
    assert format_delta(1 / 30000) == "3.34e-05"  # 3.3333e-05 rounded up, not down


def test_private_card_states_the_guarantee_in_words_and_numbers(tmp_path):
    path = save_model_card(tmp_path, PRIVATE_RECORD, dataset_name="stanfordnlp/sst2", tags=["sst2"])
    assert path == os.path.join(tmp_path, CARD_NAME)
    card = ModelCard.load(path)
    text = card.content

    assert card.data.library_name == "peft"
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.datasets == ["stanfordnlp/sst2"]
    assert {"hf_fedlora", "federated-learning", "ffa_lora", "differential-privacy", "sst2"} <= set(card.data.tags)

    privacy = PRIVATE_RECORD["privacy"]
    epsilon, delta = format_epsilon(privacy["epsilon"]), format_delta(privacy["delta"])
    assert (epsilon, delta) == ("7.99", "1e-05")
    assert f"(ε = {epsilon}, δ = {delta})-differential privacy for every training example of every client" in text
    assert "(unit: one example)" in text
    assert "PRV accountant" in text
    assert "clip norm 1.0" in text
    assert "No amplification from client sampling is claimed" in text
    assert "Evaluation data were not protected" in text

    for name, client in privacy["clients"].items():
        cells = table_row(section(text, "Privacy guarantee"), name)
        assert cells[1] == str(client["num_examples"])
        assert cells[4] == str(client["steps"])
        assert cells[-1] == format_epsilon(client["epsilon"])
        assert float(cells[2]) == pytest.approx(client["noise_multiplier"], rel=1e-3)

    # Eval results of the last round, in the metadata the Hub reads; speed metrics are not results.
    results = front_matter(text)["model-index"][0]["results"]
    metrics = {m["type"]: m["value"] for result in results for m in result["metrics"]}
    assert metrics == {"accuracy": 0.78, "loss": 0.52}
    assert results[0]["dataset"]["type"] == "stanfordnlp/sst2"
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "loss"}

    # Per-round results table, epsilon per round as formatted.
    assert table_row(section(text, "Training results"), "2")[:4] == ["2", "3", "0.5912", "7.99"]
    assert 'AutoModelForSequenceClassification.from_pretrained("google-bert/bert-base-uncased")' in text
    assert "sun2024improving" in text and "Improving {LoRA} in Privacy-preserving Federated Learning" in text


@pytest.mark.parametrize("unit", ["example", "client"])
def test_card_says_how_the_examples_were_clipped(tmp_path, unit):
    """Flat clipping (records from before `dp_clipping` existed too) vs each tensor to C/sqrt(P)."""
    flat_record = copy.deepcopy(PRIVATE_RECORD)
    flat_record["privacy"]["unit"] = unit
    flat_text = ModelCard.load(save_model_card(tmp_path / "flat", flat_record)).content
    per_layer_record = copy.deepcopy(flat_record)
    per_layer_record["privacy"]["clipping"] = "per_layer"
    per_layer_text = ModelCard.load(save_model_card(tmp_path / "per_layer", per_layer_record)).content

    together = "all trained parameters together" if unit == "example" else "every tensor it sent, together"
    assert together in flat_text and "√P" not in flat_text
    assert together not in per_layer_text
    assert "to 1.0/√P" in per_layer_text
    assert "within clip norm 1.0" in per_layer_text


def test_non_private_card_says_there_is_no_guarantee_and_gives_no_epsilon(tmp_path):
    card = ModelCard.load(save_model_card(tmp_path, non_private_record()))
    text = card.content
    assert "This adapter has NO differential-privacy guarantee" in text
    assert "differential-privacy" not in card.data.tags
    assert "lora" in card.data.tags
    assert "ε" not in text and "epsilon" not in text.lower()
    assert "(unit: one example)" not in text
    assert "hu2022lora" in text  # the LoRA paper for the lora baseline


def test_non_private_card_refuses_a_differential_privacy_tag():
    with pytest.raises(ValueError, match="no differential-privacy guarantee"):
        build_model_card(non_private_record(), tags=["differential-privacy"])


def test_card_without_eval_metrics_has_no_eval_results_and_custom_dataset_otherwise():
    record = copy.deepcopy(PRIVATE_RECORD)
    for entry in record["round_history"]:
        for key in [k for k in entry if k.startswith("eval_")]:
            del entry[key]
    card = build_model_card(record)
    assert card.data.eval_results is None
    assert "model-index" not in front_matter(str(card))

    card = build_model_card(PRIVATE_RECORD)  # metrics but no dataset name
    assert {r.dataset_type for r in card.data.eval_results} == {"custom"}


def test_local_base_model_path_stays_out_of_the_metadata_but_is_in_the_loading_example(tmp_path):
    record = copy.deepcopy(PRIVATE_RECORD)
    base = str(tmp_path / "models" / "my-bert")
    record["base_model"] = base
    card = build_model_card(record, repo_id="me/ffa-sst2")
    assert card.data.base_model is None  # the Hub rejects a base_model that is not a model id
    assert f'from_pretrained("{base}")' in card.content
    assert 'PeftModel.from_pretrained(base, "me/ffa-sst2")' in card.content
    assert card.data.model_name == "ffa_lora-my-bert"


# ----------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", CARD_NAME, FEDERATED_RECORD_NAME]


def output_folder(path):
    """An output folder with the shareable files plus things that must never be uploaded."""
    for name in ADAPTER_FILES + ["training_args.bin", "client_0_privacy.json"]:
        (path / name).write_text("x")
    (path / "checkpoint-1").mkdir()
    (path / "checkpoint-1" / "adapter_config.json").write_text("x")
    return path


def test_upload_files_creates_the_repo_and_uploads_exactly_the_listed_files(tmp_path):
    folder = output_folder(tmp_path)
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create_repo,
        mock.patch.object(HfApi, "upload_folder", autospec=True, return_value="commit-info") as upload_folder,
    ):
        result = upload_files(
            folder, ADAPTER_FILES, repo_id="me/ffa-sst2", token="hf_test", private=True, commit_message="Round 2"
        )
    assert result == "commit-info"
    create_repo.assert_called_once()
    api, repo_id = create_repo.call_args.args
    assert repo_id == "me/ffa-sst2"
    assert api.token == "hf_test"
    assert create_repo.call_args.kwargs["private"] is True
    assert create_repo.call_args.kwargs["exist_ok"] is True

    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert upload_folder.call_args.args[0] is api
    assert kwargs["repo_id"] == "me/ffa-sst2"
    assert os.path.samefile(kwargs["folder_path"], folder)
    assert kwargs["commit_message"] == "Round 2"
    assert set(kwargs["allow_patterns"]) == set(ADAPTER_FILES)
    # What huggingface_hub will select with those patterns: the listed files, nothing else.
    everything = [os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs]
    assert set(filter_repo_objects(everything, allow_patterns=kwargs["allow_patterns"])) == set(ADAPTER_FILES)


@pytest.mark.parametrize(
    "files, message",
    [
        (ADAPTER_FILES + ["optimizer.pt"], "missing.*optimizer.pt"),
        (["adapter_config.json", "checkpoint-1/adapter_config.json"], "directly in"),
        (["adapter_config.json", "../secrets.json"], "directly in"),
        (["adapter_config.json", "checkpoint-1"], "plain files"),
    ],
)
def test_upload_files_refuses_bad_file_lists_before_touching_the_hub(tmp_path, files, message):
    (tmp_path / "out").mkdir()
    folder = output_folder(tmp_path / "out")
    (tmp_path / "secrets.json").write_text("x")
    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create_repo,
        mock.patch.object(HfApi, "upload_folder", autospec=True) as upload_folder,
    ):
        with pytest.raises(ValueError, match=message):
            upload_files(folder, files, repo_id="me/ffa-sst2")
    create_repo.assert_not_called()
    upload_folder.assert_not_called()


# ----------------------------------------------------------------------------------------
# Loading the record
# ----------------------------------------------------------------------------------------
def test_load_federated_record_from_a_local_folder(tmp_path):
    (tmp_path / FEDERATED_RECORD_NAME).write_text(json.dumps(PRIVATE_RECORD))
    assert load_federated_record(str(tmp_path)) == PRIVATE_RECORD
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not saved by hf_fedlora's FederatedTrainer"):
        load_federated_record(str(empty))
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
        load_federated_record(str(tmp_path / "no" / "such" / "folder"))


def test_load_federated_record_by_repo_id_from_the_local_hub_cache_offline(tmp_path):
    assert constants.HF_HUB_OFFLINE  # nothing may be fetched: the cache must answer
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--ffa-sst2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / FEDERATED_RECORD_NAME).write_text(json.dumps(PRIVATE_RECORD))
    assert load_federated_record("org/ffa-sst2", cache_dir=str(cache)) == PRIVATE_RECORD

    bare = cache / "models--org--plain-lora"  # a cached adapter without a record
    (bare / "refs").mkdir(parents=True)
    (bare / "refs" / "main").write_text(commit)
    (bare / "snapshots" / commit).mkdir(parents=True)
    (bare / "snapshots" / commit / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not saved by hf_fedlora's FederatedTrainer"):
        load_federated_record("org/plain-lora", cache_dir=str(cache))


# ----------------------------------------------------------------------------------------
# From a real run
# ----------------------------------------------------------------------------------------
def test_card_from_a_real_private_run_states_the_trainers_epsilon(tmp_path):
    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path / "run", dp_target_epsilon=3.0),
        train_dataset=toy_dataset(),
        eval_dataset=toy_dataset(40, seed=1),
        compute_metrics=accuracy,
    )
    trainer.train()
    record = json.loads(json.dumps(trainer.federated_record()))  # as saved: plain JSON
    record.setdefault("task_type", "SEQ_CLS")
    record.setdefault("lora", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    if not record.get("base_model"):
        record["base_model"] = "hf-internal-testing/tiny-random-BertModel"
    report = trainer.privacy_report()
    assert 0 < report["epsilon"] <= 3.0

    card = build_model_card(record, dataset_name="toy")
    text = card.content
    assert f"(ε = {format_epsilon(report['epsilon'])}, δ = {format_delta(report['delta'])})" in text
    for name, client in report["clients"].items():
        assert table_row(section(text, "Privacy guarantee"), name)[-1] == format_epsilon(client["epsilon"])
    assert "differential-privacy" in card.data.tags and "ffa_lora" in card.data.tags
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "loss"}

    # Saving the adapter writes this card and the record beside it; the record reads back.
    trainer.save_model(str(tmp_path / "saved"))
    saved = ModelCard.load(tmp_path / "saved" / CARD_NAME)
    assert saved.data.library_name == "peft" and "differential-privacy" in saved.data.tags
    assert f"ε = {format_epsilon(report['epsilon'])}" in saved.content
    assert load_federated_record(str(tmp_path / "saved"))["privacy"]["epsilon"] == pytest.approx(report["epsilon"])


@pytest.mark.parametrize(
    "model_class, imported",
    [
        ("transformers.models.bert.modeling_bert.BertForSequenceClassification", "from transformers import Auto"),
        ("transformers_modules.me.my_model.MyBertForSequenceClassification", "from transformers import Auto"),
        (None, "from transformers import Auto"),
        (
            "hf_fedlora.models.mean_pooling.BertMeanPoolingForSequenceClassification",
            "from hf_fedlora.models.mean_pooling import BertMeanPoolingForSequenceClassification",
        ),
    ],
)
def test_the_loading_code_names_the_recorded_class_only_when_no_auto_class_builds_it(model_class, imported):
    record = {**copy.deepcopy(PRIVATE_RECORD), "base_model_class": model_class}
    content = build_model_card(record, repo_id="me/ffa-sst2").content
    assert imported in content
    assert ("`hf_fedlora` is not needed to load or use it" in content) == imported.startswith("from transformers")


def test_the_card_reads_the_methods_name_sentence_and_citation_from_its_registered_class():
    """A method registered from outside (one file's worth) gets its own name, sentence and BibTeX on the card;
    a method this hf_fedlora does not know is named as recorded, with no paper cited."""
    record = non_private_record()
    record["method"] = {"method": "toy_lora", "init_seed": 0}
    with registered_toy():
        text = build_model_card(record).content
    assert f"**{ToyMethod.display_name}** (`toy_lora`): {ToyMethod.description}" in text
    assert TOY_CITATION in section(text, "Citation")
    assert "hu2022lora" not in text and "sun2024improving" not in text  # no other method's paper

    text = build_model_card(record).content  # unregistered again
    assert "**toy_lora** (`toy_lora`): The federated LoRA method `toy_lora`." in text
    assert "toy2026lora" not in text
