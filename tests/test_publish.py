"""Publishing a federated adapter: push_to_hub uploads exactly the adapter, its card and its record; others load
it by repo id with plain peft; the config class comes back from the record; checkpoints carry the card."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import torch
from huggingface_hub import HfApi, ModelCard
from peft import PeftModel
from safetensors.torch import load_file
from test_portability import _load_in_plain_peft, _logits, _train_and_save
from tiny import fed_args, tiny_bert, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FedLoraConfig, FFALoraConfig
from hf_fedlora.hub import format_epsilon

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "federated_training.json"}


def _private_trainer(tmp_path: Path, **overrides) -> FederatedTrainer:
    args = fed_args(tmp_path / "run", dp_target_epsilon=3.0, hub_model_id="org/fed-adapter", **overrides)
    return FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=toy_dataset(64))


def test_push_to_hub_uploads_exactly_the_adapter_card_and_record(tmp_path):
    """push_to_hub creates the repo with the privacy flag and uploads only the global adapter, card and record."""
    trainer = _private_trainer(tmp_path, hub_private_repo=True)
    trainer.train()
    output_dir = Path(trainer.args.output_dir)
    # Things a run folder may hold that must never leave the machine.
    (output_dir / "client_0_state.safetensors").write_bytes(b"per-client state")
    (output_dir / "training_args.bin").write_bytes(b"pickled")
    (output_dir / "optimizer.pt").write_bytes(b"optimizer state")
    with (
        mock.patch.object(HfApi, "create_repo") as create_repo,
        mock.patch.object(HfApi, "upload_folder") as upload_folder,
    ):
        trainer.push_to_hub(commit_message="Federated FFA-LoRA, round 2")

    create_repo.assert_called_once()
    assert (
        create_repo.call_args.args[0] == "org/fed-adapter"
        or create_repo.call_args.kwargs["repo_id"] == "org/fed-adapter"
    )
    assert create_repo.call_args.kwargs["private"] is True
    upload_folder.assert_called_once()
    kwargs = upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "org/fed-adapter"
    assert kwargs["commit_message"] == "Federated FFA-LoRA, round 2"
    assert Path(kwargs["folder_path"]) == output_dir
    assert set(kwargs["allow_patterns"]) == ADAPTER_FILES
    selected = {p.name for p in output_dir.iterdir() if p.is_file() and p.name in set(kwargs["allow_patterns"])}
    assert selected == ADAPTER_FILES
    card = ModelCard.load(output_dir / "README.md")
    assert format_epsilon(trainer.privacy_report()["epsilon"]) in card.text
    assert "org/fed-adapter" in card.text  # the card's loading example names the repo


def _as_hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay a folder out as huggingface_hub's cache would after downloading repo_id at one commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo_dir / "snapshots" / commit)


def test_adapter_loads_by_repo_id_in_plain_peft(tmp_path):
    """Someone without hf_fedlora loads the pushed adapter by repo id (offline, from the cache): same logits."""
    trainer, _, trained_logits, base_dir, adapter_dir, batch_file = _train_and_save(tmp_path, FFALoraConfig, True)
    cache = tmp_path / "hub_cache"
    _as_hub_cache(cache, "org/fed-adapter", adapter_dir)

    result, logits_file = _load_in_plain_peft(
        tmp_path, base_dir, "org/fed-adapter", batch_file, "hub", extra_env={"HF_HUB_CACHE": str(cache)}
    )
    assert result.returncode == 0 and "LOADED_OK" in result.stdout, result.stderr[-4000:]
    assert torch.allclose(load_file(str(logits_file))["logits"], trained_logits, rtol=0, atol=1e-6)


def test_config_from_pretrained_returns_the_method_config_and_reproduces_the_adapter(tmp_path):
    """FedLoraConfig.from_pretrained gives back FFALoraConfig (with its init_seed) and loads the same adapter."""
    trainer, _, trained_logits, base_dir, adapter_dir, batch_file = _train_and_save(tmp_path, FFALoraConfig, True)

    config = FedLoraConfig.from_pretrained(str(adapter_dir))
    assert type(config) is FFALoraConfig and config.init_seed == 0 and config.r == 4
    assert FFALoraConfig.from_pretrained(str(adapter_dir)).method_name == "ffa_lora"

    cache = tmp_path / "hub_cache"
    _as_hub_cache(cache, "org/fed-adapter", adapter_dir)
    by_repo = FedLoraConfig.from_pretrained("org/fed-adapter", cache_dir=str(cache))
    assert type(by_repo) is FFALoraConfig

    base = tiny_bert(seed=0)
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config)
    batch = load_file(str(batch_file))
    assert torch.allclose(_logits(model, batch), trained_logits, rtol=0, atol=1e-6)


def test_every_checkpoint_carries_adapter_card_and_record(tmp_path):
    """With save_strategy='epoch' (a round), each checkpoint-<round> holds the adapter, its card and its record."""
    trainer = _private_trainer(tmp_path, save_strategy="epoch", num_rounds=2)
    trainer.train()
    for round_index in (1, 2):
        folder = Path(trainer.args.output_dir) / f"checkpoint-{round_index}"
        assert ADAPTER_FILES <= {p.name for p in folder.iterdir()}, folder
        card = ModelCard.load(folder / "README.md")
        assert "differential-privacy" in card.data.tags
    first = load_file(str(Path(trainer.args.output_dir) / "checkpoint-1" / "adapter_model.safetensors"))
    last = load_file(str(Path(trainer.args.output_dir) / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first if "lora_B" in k)  # saved per round, not once


def test_push_to_hub_argument_pushes_at_checkpoints_and_on_save_model(tmp_path):
    """args.push_to_hub with hub_strategy='every_save' pushes after every round checkpoint and on save_model()."""
    trainer = _private_trainer(
        tmp_path, push_to_hub=True, hub_strategy="every_save", save_strategy="epoch", num_rounds=2
    )
    with (
        mock.patch.object(HfApi, "create_repo") as create_repo,
        mock.patch.object(HfApi, "upload_folder") as upload_folder,
    ):
        trainer.train()
        assert upload_folder.call_count == 2  # one push per round checkpoint
        trainer.save_model()  # Trainer semantics: save_model pushes when push_to_hub is set
    assert upload_folder.call_count == 3 and create_repo.call_count == 3
    messages = [call.kwargs["commit_message"] for call in upload_folder.call_args_list]
    assert messages[:2] == ["Training in progress, round 1", "Training in progress, round 2"]
    assert all(set(call.kwargs["allow_patterns"]) == ADAPTER_FILES for call in upload_folder.call_args_list)
