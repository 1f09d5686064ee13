"""A crash must not cost the run, and above all must never make the printed epsilon smaller than what was spent."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import fed_args, tiny_peft, toy_dataset
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_fedlora import FederatedTrainer, FFALoraConfig, RoLoraConfig
from hf_fedlora.privacy.secret_store import SecretStore
from hf_fedlora.trainer import RESUME_STATE, RESUME_WEIGHTS

TESTS = Path(__file__).parent


class StopAfter(TrainerCallback):
    """Stops training after the given round, as an interrupted run would."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.rounds:
            control.should_training_stop = True


def run_args(tmp_path, **overrides):
    args = dict(num_rounds=4, local_steps=2, save_strategy="epoch", dp_noise_multiplier=1.0, dp_secret_seed=1234)
    args.update(overrides)
    return fed_args(tmp_path, **args)


def state_of(trainer: FederatedTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.global_state().items()}


@pytest.mark.parametrize("config_cls", [FFALoraConfig, RoLoraConfig], ids=["ffa_lora", "rolora"])
@pytest.mark.parametrize(
    "private",
    ["example", "client", "distributed", None],
    ids=["dp", "client_dp", "client_dp_distributed", "non_private"],
)
def test_resume_gives_the_uninterrupted_run_bit_for_bit(tmp_path, config_cls, private):
    """Under client-level DP too: the aggregator's noise and participation streams continue from the secret store
    (a replayed stream would give the same noise twice, and another adapter); under distributed noise the plan (its
    grid) comes back with it."""
    privacy = {
        "example": {"dp_unit": "example", "clients_per_round": 1},
        "client": {"dp_unit": "client", "clients_per_round": 1},
        "distributed": {
            "dp_unit": "client",
            "dp_noise_placement": "distributed",
            "dp_neighbouring_relation": "zero_out_one",
        },
        None: {"dp_noise_multiplier": None},
    }[private]
    whole = FederatedTrainer(
        tiny_peft(config_cls), run_args(tmp_path / "whole", **privacy), train_dataset=toy_dataset()
    )
    whole.train()

    stopped = FederatedTrainer(
        tiny_peft(config_cls),
        run_args(tmp_path / "split", **privacy),
        train_dataset=toy_dataset(),
        callbacks=[StopAfter(2)],
    )
    stopped.train()
    assert stopped._rounds_done == 2
    resumed = FederatedTrainer(
        tiny_peft(config_cls), run_args(tmp_path / "split", **privacy), train_dataset=toy_dataset()
    )
    resumed.train(resume_from_checkpoint=True)

    assert resumed._rounds_done == 4
    for name, tensor in state_of(whole).items():
        assert torch.equal(tensor, resumed.global_state()[name]), name
    assert resumed.privacy_report() == whole.privacy_report()
    assert [r["round"] for r in resumed.federated_record()["round_history"]] == [1, 2, 3, 4]


def secret_state_of(output_dir: Path) -> dict:
    """The secret DP state a run's last checkpoint names (in the secret store, not beside the checkpoint)."""
    checkpoint = Path(get_last_checkpoint(str(output_dir)))
    run_id = json.loads((checkpoint / RESUME_STATE).read_text())["secret_state"]
    return SecretStore(run_id).load()


def test_checkpoints_hold_resume_state_but_no_secret_and_nothing_private_is_pushed(tmp_path):
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path, num_rounds=2), train_dataset=toy_dataset())
    trainer.train()
    checkpoint = Path(get_last_checkpoint(str(tmp_path)))
    assert (checkpoint / RESUME_STATE).is_file() and (checkpoint / RESUME_WEIGHTS).is_file()
    trainer.save_model()
    assert not {RESUME_STATE, RESUME_WEIGHTS} & set(trainer._saved_files)
    # The noise and sampler states regenerate every noise tensor: never beside anything a user shares.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md"):
            text = path.read_text()
            assert "noise_generator" not in text and "sampling_generator" not in text, path
            assert "1234" not in text, path  # the secret seed
    store = trainer._secret_store()
    assert store.exists() and tmp_path not in store.path.parents
    assert (store.path.stat().st_mode & 0o777) == 0o600 and (store.directory.stat().st_mode & 0o777) == 0o700
    assert "noise_generator" in store.path.read_text()


def test_resume_without_the_secret_state_is_refused(tmp_path):
    FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path, num_rounds=2), train_dataset=toy_dataset()).train()
    run_id = json.loads((Path(get_last_checkpoint(str(tmp_path))) / RESUME_STATE).read_text())["secret_state"]
    SecretStore(run_id).path.unlink()
    resumed = FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path, num_rounds=3), train_dataset=toy_dataset())
    with pytest.raises(FileNotFoundError, match="secret DP state"):
        resumed.train(resume_from_checkpoint=True)


def test_save_total_limit_is_honoured(tmp_path):
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig), run_args(tmp_path, save_total_limit=2), train_dataset=toy_dataset()
    )
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


def test_a_failed_save_leaves_no_folder_a_later_run_takes_for_a_checkpoint(tmp_path, monkeypatch):
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path), train_dataset=toy_dataset())
    original = trainer._resume_state

    def failing_on_round_three():
        if trainer._rounds_done == 3:
            raise OSError("disk full")
        return original()

    monkeypatch.setattr(trainer, "_resume_state", failing_on_round_three)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-2")
    resumed = FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path), train_dataset=toy_dataset())
    resumed.train(resume_from_checkpoint=True)
    assert resumed._rounds_done == 4


def test_resume_without_a_checkpoint_is_refused_clearly(tmp_path):
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), run_args(tmp_path), train_dataset=toy_dataset())
    with pytest.raises(ValueError, match="no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


# ----------------------------------------------------------------------------------------
# Killed for real, mid-round
# ----------------------------------------------------------------------------------------
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import conftest  # offline
    from tiny import fed_args, tiny_peft, toy_dataset
    from hf_fedlora import FederatedTrainer, FFALoraConfig

    class KilledMidRound(FederatedTrainer):
        def local_round(self, name, round_index, sub_round, steps):
            if round_index == 2 and name == "client_1":  # client_0 has run round 3's steps: then SIGKILL
                os.kill(os.getpid(), signal.SIGKILL)
            return super().local_round(name, round_index, sub_round, steps)

    args = fed_args({output!r}, num_rounds=4, local_steps=2, save_strategy="epoch", {privacy})
    KilledMidRound(tiny_peft(FFALoraConfig), args, train_dataset=toy_dataset()).train()
    """
)


def killed_run(output: Path, privacy: str) -> subprocess.CompletedProcess:
    script = KILLED_RUN.format(tests=str(TESTS), output=str(output), privacy=privacy)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_never_under_counts(tmp_path):
    privacy = "dp_noise_multiplier=1.0"
    done = killed_run(tmp_path / "killed", privacy)
    assert done.returncode == -9, done.stderr[-2000:]
    assert get_last_checkpoint(str(tmp_path / "killed")).endswith("checkpoint-2")
    assert not list((tmp_path / "killed").glob(".partial-*")) or get_last_checkpoint(str(tmp_path / "killed"))

    resumed = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path / "killed", num_rounds=4, local_steps=2, save_strategy="epoch", dp_noise_multiplier=1.0),
        train_dataset=toy_dataset(),
    )
    resumed.train(resume_from_checkpoint=True)
    whole = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path / "whole", num_rounds=4, local_steps=2, dp_noise_multiplier=1.0),
        train_dataset=toy_dataset(),
    )
    whole.train()
    after, uninterrupted = resumed.privacy_report()["clients"], whole.privacy_report()["clients"]
    assert after["client_0"]["steps"] == uninterrupted["client_0"]["steps"] + 2  # the lost round's 2 steps count
    assert after["client_1"]["steps"] == uninterrupted["client_1"]["steps"]
    for name in uninterrupted:
        assert after[name]["epsilon"] >= uninterrupted[name]["epsilon"]


@pytest.mark.slow
def test_sigkill_under_a_target_recalibrates_and_stays_within_it(tmp_path):
    done = killed_run(tmp_path, "dp_target_epsilon=3.0")
    assert done.returncode == -9, done.stderr[-2000:]
    ledger = secret_state_of(tmp_path)["engine"]  # the newest: written before client_0's round-3 release
    resumed = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_rounds=4, local_steps=2, save_strategy="epoch", dp_target_epsilon=3.0),
        train_dataset=toy_dataset(),
    )
    resumed.train(resume_from_checkpoint=True)
    report = resumed.privacy_report()
    client = report["clients"]["client_0"]
    assert client["steps"] == 4 * 2 + 2  # every planned step plus the lost round's
    assert (
        client["history"][: len(ledger["clients"]["client_0"]["history"])] == ledger["clients"]["client_0"]["history"]
    )
    assert report["epsilon"] <= 3.0


# ----------------------------------------------------------------------------------------
# A client that fails inside a round
# ----------------------------------------------------------------------------------------
class FlakyClient(FederatedTrainer):
    """client_1 raises on its second local step of round 2."""

    def local_round(self, name, round_index, sub_round, steps):
        self._now = (name, round_index)
        self._calls = 0
        return super().local_round(name, round_index, sub_round, steps)

    def _local_step(self, data, indices, optimizer):
        self._calls += 1
        if self._now == ("client_1", 1) and self._calls == 2:
            raise RuntimeError("hospital network down")
        return super()._local_step(data, indices, optimizer)


def test_a_failing_client_does_not_fail_the_round_when_the_minimum_is_met(tmp_path, caplog):
    trainer = FlakyClient(
        tiny_peft(FFALoraConfig), run_args(tmp_path, num_rounds=3, min_clients_per_round=1), train_dataset=toy_dataset()
    )
    with caplog.at_level(logging.WARNING, logger="hf_fedlora.server"):
        trainer.train()
    assert trainer._rounds_done == 3
    assert "Round 2: client 'client_1' failed" in caplog.text and "hospital network down" in caplog.text
    report = trainer.privacy_report()["clients"]
    assert report["client_1"]["steps"] == 3 * 2  # the failed round's two attempted steps (one failed) both count
    assert report["client_0"]["steps"] == 3 * 2
    assert trainer.federated_record()["failed_clients"] == {"2": ["client_1"]}


def test_a_failing_client_fails_the_round_below_the_minimum(tmp_path):
    trainer = FlakyClient(
        tiny_peft(FFALoraConfig), run_args(tmp_path, num_rounds=3, min_clients_per_round=2), train_dataset=toy_dataset()
    )
    with pytest.raises(RuntimeError, match="min_clients_per_round=2") as error:
        trainer.train()
    assert "client_1" in str(error.value)
    assert trainer._rounds_done == 1
    assert trainer.privacy_report()["clients"]["client_1"]["steps"] == 2 + 2  # round 1 and the failed attempt
