"""`hf-fedlora verify`: an adapter's privacy claim re-derived by an accountant independent of the trainer's.

It passes on what the trainer saves, fails (exit 1, naming the problem) when the card or the record was
edited to claim less privacy spent than the history shows, says plainly when there is no guarantee, and
cannot be fooled into a pass by files it cannot read (exit 2).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants
from opacus.accountants import PRVAccountant, RDPAccountant
from peft import PeftModel
from scipy.optimize import brentq
from scipy.stats import norm
from tiny import fed_args, tiny_bert, tiny_peft, toy_dataset

from hf_fedlora import DeerConfig, FederatedTrainer, FFALoraConfig
from hf_fedlora.cli import main
from hf_fedlora.hub import CARD_NAME, FEDERATED_RECORD_NAME, format_epsilon, save_model_card
from hf_fedlora.verify import (
    DEFAULT_RELATIVE_TOLERANCE,
    DEFAULT_TOLERANCE,
    allowed_shortfall,
    format_report,
    independent_epsilon,
    verify_adapter,
)


@pytest.fixture(scope="module")
def dp_adapter(tmp_path_factory) -> Path:
    """A short DP run (RDP accountant, target epsilon 3), saved as any user would save it."""
    root = tmp_path_factory.mktemp("dp")
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig), fed_args(root / "run", dp_target_epsilon=3.0), train_dataset=toy_dataset(64)
    )
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    return root / "adapter"


@pytest.fixture(scope="module")
def non_private_adapter(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plain")
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), fed_args(root / "run"), train_dataset=toy_dataset(64))
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    return root / "adapter"


SKEWED = {"client_0": 16, "client_1": 64, "client_2": 48}  # one local epoch at batch 8: 2, 8 and 6 steps a round


def skewed_clients() -> dict:
    return {name: toy_dataset(size, seed=index) for index, (name, size) in enumerate(SKEWED.items())}


@pytest.fixture(scope="module")
def skewed_adapter(tmp_path_factory) -> Path:
    """Three clients of unequal size at one noise multiplier, every client in every round: the smallest
    (q = 8/16) spends the most. A record without `schedule`, as every record written so far."""
    root = tmp_path_factory.mktemp("skewed")
    args = fed_args(root / "run", num_clients=3, local_steps=None, local_epochs=1.0, dp_noise_multiplier=1.0)
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=skewed_clients())
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    return root / "adapter"


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory) -> tuple[Path, dict, dict]:
    """2 of 3 clients a round for 3 rounds; also the schedule and the local steps the trainer ran, in the form
    the record's `schedule` ({"1": [names]}) and `steps_per_round` take."""
    root = tmp_path_factory.mktemp("partial")
    args = fed_args(
        root / "run",
        num_clients=3,
        clients_per_round=2,
        num_rounds=3,
        local_steps=None,
        local_epochs=1.0,
        dp_noise_multiplier=1.0,
    )
    trainer = FederatedTrainer(tiny_peft(FFALoraConfig), args, train_dataset=skewed_clients())
    trainer.train()
    trainer.save_model(str(root / "adapter"))
    schedule = {str(index + 1): names for index, names in trainer.federation.schedule.items()}
    steps_per_round = {name: trainer.local_steps_for(size) for name, size in SKEWED.items()}
    return root / "adapter", schedule, steps_per_round


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "adapter"))


def edit_record(folder: Path, change) -> dict:
    path = folder / FEDERATED_RECORD_NAME
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return record


def edit_card(folder: Path, old: str, new: str) -> None:
    path = folder / CARD_NAME
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new), encoding="utf-8")


def restate(folder: Path, change) -> dict:
    """Edit the record as a forger who knows the accountant would: change it, then make every client's epsilon the
    independent PLD value of its (changed) history, the run's epsilon their largest, and write the card anew from
    the record. Only the checks of the record against the federation it describes are left to catch the change."""
    path = folder / FEDERATED_RECORD_NAME
    record = json.loads(path.read_text())
    change(record)
    privacy = record["privacy"]
    for client in privacy["clients"].values():
        client["epsilon"] = independent_epsilon(client["history"], privacy["delta"])
    privacy["epsilon"] = max(client["epsilon"] for client in privacy["clients"].values())
    path.write_text(json.dumps(record))
    save_model_card(folder, record)
    return record


def verdict(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("RESULT: "))


TOLERANCE_STATED = (
    f"(tolerance: a claimed ε may sit below the independent PLD ε by at most max({DEFAULT_TOLERANCE:g}, "
    f"{DEFAULT_RELATIVE_TOLERANCE:.0%} of it))"
)


def verify_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["verify", *map(str, args)])
    return code, capsys.readouterr().out


def problem_names(folder: Path | str, **kwargs) -> set[str]:
    return {problem.name for problem in verify_adapter(folder, **kwargs).problems}


# ----------------------------------------------------------------------------------------
# A saved DP adapter passes, and the output says what the guarantee covers
# ----------------------------------------------------------------------------------------
def test_verify_passes_on_a_saved_dp_adapter_and_states_the_guarantee(dp_adapter, capsys):
    code, out = verify_cli(capsys, dp_adapter)
    assert code == 0, out
    assert "RESULT: OK" in out
    record = json.loads((dp_adapter / FEDERATED_RECORD_NAME).read_text())["privacy"]
    assert f"(ε = {format_epsilon(record['epsilon'])}, δ = 1e-05)" in out
    assert "dp_accounting" in out and "PLD" in out
    assert f"max({DEFAULT_TOLERANCE:g}, {DEFAULT_RELATIVE_TOLERANCE:.0%} of it)" in out  # the tolerance is stated
    assert "unit: one example" in out
    covered, _, not_covered = out.partition("What it does not cover:")
    for name in record["clients"]:
        assert name in covered
    for item in ("Evaluation data", "without noise", "Group privacy", "base model"):
        assert item in not_covered

    report = verify_adapter(dp_adapter)
    assert report.ok and report.exit_code == 0 and report.private
    assert set(report.independent) == set(record["clients"])
    for name, client in record["clients"].items():
        # The trainer's own (RDP) epsilon is an upper bound: never below the independent PLD value.
        assert 0 < report.independent[name] <= client["epsilon"] + allowed_shortfall(report.independent[name])


def test_json_report_is_machine_readable(dp_adapter, capsys):
    code, out = verify_cli(capsys, dp_adapter, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["exit_code"] == 0
    assert data["problems"] == []
    assert data["record_claim"]["unit"] == "example"
    assert set(data["independent"]) == set(data["record_claim"]["clients"])
    assert data["tolerance"] == DEFAULT_TOLERANCE


# ----------------------------------------------------------------------------------------
# Edits that claim less privacy spent than the history shows fail, naming the problem
# ----------------------------------------------------------------------------------------
def test_card_epsilon_edited_smaller_fails(dp_adapter, tmp_path, capsys):
    folder = copy_of(dp_adapter, tmp_path)
    record = json.loads((folder / FEDERATED_RECORD_NAME).read_text())["privacy"]
    printed = format_epsilon(record["epsilon"])
    edit_card(folder, f"(ε = {printed}, δ", "(ε = 1.00, δ")
    code, out = verify_cli(capsys, folder)
    assert code == 1
    assert "[card-epsilon-mismatch]" in out and "[card-epsilon-below-independent]" in out


def test_card_client_epsilon_edited_smaller_fails(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)
    client = json.loads((folder / FEDERATED_RECORD_NAME).read_text())["privacy"]["clients"]["client_0"]
    edit_card(folder, f"| {client['steps']} | {format_epsilon(client['epsilon'])} |", f"| {client['steps']} | 0.50 |")
    assert {"card-epsilon-mismatch", "card-epsilon-below-independent"} <= problem_names(folder)


def test_record_epsilon_edited_smaller_fails(dp_adapter, tmp_path, capsys):
    folder = copy_of(dp_adapter, tmp_path)

    def smaller(record):
        privacy = record["privacy"]
        privacy["epsilon"] = 1.0
        for client in privacy["clients"].values():
            client["epsilon"] = 1.0

    edit_record(folder, smaller)
    code, out = verify_cli(capsys, folder)
    assert code == 1
    assert "[record-epsilon-below-independent]" in out
    assert "[card-epsilon-mismatch]" in out  # the card no longer prints the record's number either


def test_record_epsilon_that_is_not_the_largest_client_epsilon_fails(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)
    edit_record(folder, lambda r: r["privacy"].update(epsilon=r["privacy"]["epsilon"] / 2))
    assert {"record-epsilon-not-max", "record-epsilon-below-independent"} <= problem_names(folder)


def test_client_history_edited_smaller_fails(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)

    def fewer_steps(record):
        history = record["privacy"]["clients"]["client_0"]["history"]
        history[0][2] = history[0][2] - 1

    edit_record(folder, fewer_steps)
    assert "record-steps-mismatch" in problem_names(folder)


def test_history_that_spends_more_than_the_claim_fails(dp_adapter, tmp_path):
    """A consistent record whose history implies a larger epsilon than it claims: only the re-derivation sees it."""
    folder = copy_of(dp_adapter, tmp_path)

    def more_steps(record):
        client = record["privacy"]["clients"]["client_0"]
        client["history"][0][2] *= 4
        client["steps"] = sum(entry[2] for entry in client["history"])

    edit_record(folder, more_steps)
    names = problem_names(folder)
    assert {"record-epsilon-below-independent", "card-epsilon-below-independent"} <= names
    assert "record-steps-mismatch" not in names


def test_card_unit_differing_from_the_record_fails(dp_adapter, tmp_path, capsys):
    folder = copy_of(dp_adapter, tmp_path)
    edit_card(folder, "for every training example", "for every client")
    edit_card(folder, "(unit: one example)", "(unit: one client)")
    code, out = verify_cli(capsys, folder)
    assert code == 1 and "[card-unit-mismatch]" in out
    assert problem_names(folder) == {"card-unit-mismatch"}


def test_unknown_unit_in_the_record_fails(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)
    edit_record(folder, lambda r: r["privacy"].update(unit="user"))
    report = verify_adapter(folder)
    assert report.exit_code == 1
    assert {"record-unknown-unit", "card-unit-mismatch"} <= {p.name for p in report.problems}
    assert "not understood" in report.guarantee


def test_seeded_run_verifies_and_says_the_guarantee_needs_the_seed_secret(tmp_path):
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path / "run", dp_target_epsilon=3.0, dp_secret_seed=1234),
        train_dataset=toy_dataset(64),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "seeded"))
    report = verify_adapter(tmp_path / "seeded")
    assert report.ok, report.problems
    assert "holds only while that seed stays secret" in format_report(report)


def test_seeded_record_whose_card_does_not_warn_fails(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)
    assert "seed stays secret" not in format_report(verify_adapter(folder))
    edit_record(folder, lambda r: r["privacy"].update(seeded=True))
    assert problem_names(folder) == {"card-seeded-mismatch"}


def test_continued_adapter_verifies_with_the_earlier_runs_history_composed_in(dp_adapter, tmp_path):
    """Training a saved DP adapter further composes its recorded history; verify re-derives the composed epsilon."""
    config = FFALoraConfig.from_pretrained(str(dp_adapter))
    model = PeftModel.from_pretrained(tiny_bert(), str(dp_adapter), config=config, is_trainable=True)
    trainer = FederatedTrainer(
        model, fed_args(tmp_path / "run", dp_target_epsilon=5.0, num_rounds=1), train_dataset=toy_dataset(64)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "continued"))

    report = verify_adapter(tmp_path / "continued")
    assert report.ok, report.problems
    clients = json.loads((tmp_path / "continued" / FEDERATED_RECORD_NAME).read_text())["privacy"]["clients"]
    history = clients["client_0"]["history"]
    assert len(history) == 2  # the earlier run's entry, then this run's
    assert report.independent["client_0"] == pytest.approx(independent_epsilon(history, 1e-5))
    assert report.independent["client_0"] > independent_epsilon(history[1:], 1e-5)  # the earlier spend counts
    assert any("continued an earlier run" in line for line in report.covers)

    def quarter_this_run(record):  # the earlier run's entry may have another rate; this run's may not
        client = record["privacy"]["clients"]["client_0"]
        client["sample_rate"] /= 4
        client["history"][-1][1] /= 4

    restate(tmp_path / "continued", quarter_this_run)
    assert problem_names(tmp_path / "continued") == {"record-sample-rate-mismatch"}


def test_a_new_privacy_budget_on_a_continued_adapter_is_stated_as_not_covered(dp_adapter, tmp_path):
    folder = copy_of(dp_adapter, tmp_path)
    edit_record(folder, lambda r: r.update(continued_from={"recorded": False, "new_privacy_budget": True}))
    report = verify_adapter(folder)
    assert report.ok
    assert "what that training spent is NOT in ε" in report.not_covered[0]


# ----------------------------------------------------------------------------------------
# A record that contradicts the federation it describes fails, even when its epsilons and card agree
# ----------------------------------------------------------------------------------------
def test_an_untampered_record_passes_and_the_verdict_states_the_tolerance(skewed_adapter, tmp_path, capsys):
    code, out = verify_cli(capsys, skewed_adapter)
    assert code == 0, out
    assert verdict(out) == f"RESULT: OK, every check passed {TOLERANCE_STATED} (exit code 0)."
    assert "Note:" not in out  # every client took part in every round: nothing left unchecked

    folder = copy_of(skewed_adapter, tmp_path)
    restate(folder, lambda record: None)  # the forger's tool changes nothing by itself
    assert verify_adapter(folder).ok


def test_a_record_without_its_worst_clients_entry_fails(skewed_adapter, tmp_path, capsys):
    folder = copy_of(skewed_adapter, tmp_path)
    before = json.loads((folder / FEDERATED_RECORD_NAME).read_text())
    clients = before["privacy"]["clients"]
    worst = max(clients, key=lambda name: clients[name]["epsilon"])
    assert worst == "client_0"
    after = restate(folder, lambda record: record["privacy"]["clients"].pop(worst))
    assert worst in after["client_sizes"]
    assert after["privacy"]["epsilon"] < before["privacy"]["epsilon"] - 1  # the claim dropped, consistently

    code, out = verify_cli(capsys, folder)
    assert code == 1, out
    assert f"[record-client-missing] client {worst!r}" in out
    assert verdict(out) == f"RESULT: FAILED, 1 problem(s) {TOLERANCE_STATED} (exit code 1):"
    assert problem_names(folder) == {"record-client-missing"}


def test_a_quartered_sample_rate_fails(skewed_adapter, tmp_path, capsys):
    folder = copy_of(skewed_adapter, tmp_path)

    def quarter(record):
        client = record["privacy"]["clients"]["client_2"]
        client["sample_rate"] /= 4
        for entry in client["history"]:
            entry[1] /= 4

    before = json.loads((folder / FEDERATED_RECORD_NAME).read_text())["privacy"]["clients"]["client_2"]["epsilon"]
    after = restate(folder, quarter)["privacy"]["clients"]["client_2"]["epsilon"]
    assert after < before / 2
    code, out = verify_cli(capsys, folder)
    assert code == 1, out
    assert "[record-sample-rate-mismatch] client 'client_2'" in out and "batch_size 8 / 48 examples" in out
    assert problem_names(folder) == {"record-sample-rate-mismatch"}


def test_steps_divided_by_three_fail(skewed_adapter, tmp_path, capsys):
    folder = copy_of(skewed_adapter, tmp_path)

    def a_third(record):
        client = record["privacy"]["clients"]["client_2"]
        assert client["steps"] == 2 * 6  # 2 rounds x ceil(48 / 8) local steps
        client["steps"] //= 3
        for entry in client["history"]:
            entry[2] //= 3

    restate(folder, a_third)
    code, out = verify_cli(capsys, folder)
    assert code == 1, out
    assert "[record-steps-off-schedule] client 'client_2'" in out and "has 4 steps" in out and "= 12" in out
    assert problem_names(folder) == {"record-steps-off-schedule"}


def test_a_noise_multiplier_differing_from_the_history_fails(skewed_adapter, tmp_path, capsys):
    """The card's table shows the record's noise multiplier; the history the epsilon comes from ran at another."""
    folder = copy_of(skewed_adapter, tmp_path)
    restate(folder, lambda record: record["privacy"]["clients"]["client_0"].update(noise_multiplier=2.0))
    assert "| client_0 | 16 | 2 " in (folder / CARD_NAME).read_text(encoding="utf-8")
    code, out = verify_cli(capsys, folder)
    assert code == 1, out
    assert "[record-noise-mismatch] client 'client_0'" in out and "ran at σ = 1.0" in out
    assert problem_names(folder) == {"record-noise-mismatch"}


def test_an_entry_with_another_size_than_client_sizes_fails(skewed_adapter, tmp_path):
    folder = copy_of(skewed_adapter, tmp_path)
    restate(folder, lambda record: record["privacy"]["clients"]["client_0"].update(num_examples=64))
    assert problem_names(folder) == {"record-size-mismatch"}


def test_an_entry_for_a_client_outside_the_federation_fails(skewed_adapter, tmp_path):
    folder = copy_of(skewed_adapter, tmp_path)

    def forget_client_1(record):
        record["client_sizes"].pop("client_1")
        record["steps_per_round"].pop("client_1")
        record.pop("schedule")  # the recorded schedule would name it too

    restate(folder, forget_client_1)
    assert problem_names(folder) == {"record-client-unknown", "record-client-missing"}  # num_clients still 3
    restate(folder, lambda record: record.update(num_clients=2, clients_per_round=2))
    assert problem_names(folder) == {"record-client-unknown"}


def test_a_crash_resumed_record_is_noted_not_failed(skewed_adapter, tmp_path, capsys):
    """A run resumed after a crash counts again the steps the crash cut short (more than the schedule) and, under a
    target, recalibrates the noise for the steps left (a second sigma): the epsilon re-derived from all of it only
    grows, so the record passes, with notes. (test_reliability's SIGKILL runs write such records.)"""
    folder = copy_of(skewed_adapter, tmp_path)

    def lost_round_counted_then_recalibrated(record):
        client = record["privacy"]["clients"]["client_1"]
        sigma, rate, steps = client["history"][0]
        client["history"] = [[sigma, rate, steps], [1.25 * sigma, rate, 8]]
        client.update(steps=steps + 8, noise_multiplier=1.25 * sigma)

    restate(folder, lost_round_counted_then_recalibrated)
    code, out = verify_cli(capsys, folder)
    assert code == 0, out
    assert "Note: Client 'client_1''s history has 24 steps, more than the 16 scheduled" in out
    assert "Note: Client 'client_1''s history ran at σ = 1 before σ = 1.25" in out


class FailsInRoundTwo(FederatedTrainer):
    """client_1 fails on its first local step of round 2: it runs 1 of that round's 2 steps (the failed one counts)."""

    def local_round(self, name, round_index, sub_round, steps):
        self._failing = (name, round_index) == ("client_1", 1)
        return super().local_round(name, round_index, sub_round, steps)

    def _local_step(self, data, indices, optimizer):
        if self._failing:
            raise RuntimeError("hospital network down")
        return super()._local_step(data, indices, optimizer)


def test_a_client_that_failed_inside_a_round_may_have_run_fewer_steps(tmp_path):
    args = fed_args(tmp_path / "run", num_rounds=3, min_clients_per_round=1, dp_noise_multiplier=1.0)
    trainer = FailsInRoundTwo(tiny_peft(FFALoraConfig), args, train_dataset=toy_dataset(64))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    record = json.loads((tmp_path / "adapter" / FEDERATED_RECORD_NAME).read_text())
    assert record["failed_clients"] == {"2": ["client_1"]}
    # The server counts the steps it sent (it cannot know how far a failed client got): an over-count.
    assert record["privacy"]["clients"]["client_1"]["steps"] == 3 * 2
    assert verify_adapter(tmp_path / "adapter").ok

    def one_fewer(record):  # what the client itself ran: its round-2 failure cut one step
        client = record["privacy"]["clients"]["client_1"]
        client["history"][0][2] = client["steps"] = 3 * 2 - 1

    restate(tmp_path / "adapter", one_fewer)
    assert verify_adapter(tmp_path / "adapter").ok

    def three_fewer(record):  # one failed round cannot explain more than that round's steps
        client = record["privacy"]["clients"]["client_1"]
        client["history"][0][2] = client["steps"] = 3 * 2 - 3

    restate(tmp_path / "adapter", three_fewer)
    assert problem_names(tmp_path / "adapter") == {"record-steps-off-schedule"}


def test_a_partial_participation_record_without_a_schedule_checks_the_most_steps(partial_run, tmp_path, capsys):
    adapter, _, _ = partial_run
    folder = copy_of(adapter, tmp_path)
    restate(folder, lambda record: record.pop("schedule"))  # a record written before schedules were recorded
    code, out = verify_cli(capsys, folder)
    assert code == 0, out
    assert "Note: The record does not say which clients took part in which round (2 of 3 per round)" in out

    def beyond_every_round(record):
        client = record["privacy"]["clients"]["client_1"]
        client["history"][0][2] = client["steps"] = 3 * 8 + 1

    restate(folder, beyond_every_round)
    assert problem_names(folder) == {"record-steps-off-schedule"}


def test_a_deer_record_counts_two_sub_rounds_a_round(tmp_path):
    """DEeR's deviation eliminator runs every round as two local passes (B, then A): twice the steps."""
    args = fed_args(tmp_path / "run", num_rounds=2, local_steps=2, dp_noise_multiplier=1.0)
    trainer = FederatedTrainer(tiny_peft(DeerConfig), args, train_dataset=toy_dataset(64))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    report = verify_adapter(tmp_path / "adapter")
    assert report.ok, report.problems
    assert report.notes == []  # not even more steps than scheduled
    record = json.loads((tmp_path / "adapter" / FEDERATED_RECORD_NAME).read_text())
    assert {client["steps"] for client in record["privacy"]["clients"].values()} == {2 * 2 * 2}
    assert record["sub_rounds_per_round"] == [2, 2]

    def one_pass_a_round(record):  # a forger who halves the steps and says DEeR ran one pass a round
        record["sub_rounds_per_round"] = [1, 1]
        for client in record["privacy"]["clients"].values():
            client["history"][0][2] = client["steps"] = 2 * 2

    restate(tmp_path / "adapter", one_pass_a_round)
    assert "record-schedule-mismatch" in problem_names(tmp_path / "adapter")


def with_schedule(folder: Path, schedule: dict, steps_per_round: dict, change=lambda record: None) -> None:
    def add(record):
        record.update(schedule=json.loads(json.dumps(schedule)), steps_per_round=dict(steps_per_round))
        change(record)

    restate(folder, add)


def test_a_recorded_schedule_is_checked(partial_run, tmp_path):
    adapter, schedule, steps_per_round = partial_run
    rounds_of = {name: sum(name in names for names in schedule.values()) for name in SKEWED}
    folder = copy_of(adapter, tmp_path)
    with_schedule(folder, schedule, steps_per_round)
    report = verify_adapter(folder)
    assert report.ok, report.problems
    assert report.notes == []  # with the schedule every client's steps are checked exactly

    def halve(record, name):
        client = record["privacy"]["clients"][name]
        client["steps"] //= 2
        for entry in client["history"]:
            entry[2] //= 2

    took_part_twice = next(name for name, rounds in rounds_of.items() if rounds == 2)
    folder = copy_of(adapter, tmp_path / "fewer")
    with_schedule(folder, schedule, steps_per_round, lambda record: halve(record, took_part_twice))
    assert problem_names(folder) == {"record-steps-off-schedule"}

    def left_out_of_its_last_round(record):  # the halved steps now fit the schedule, whose round lacks a client
        last = max(number for number, names in record["schedule"].items() if took_part_twice in names)
        record["schedule"][last].remove(took_part_twice)
        halve(record, took_part_twice)

    folder = copy_of(adapter, tmp_path / "short_round")
    with_schedule(folder, schedule, steps_per_round, left_out_of_its_last_round)
    assert problem_names(folder) == {"record-schedule-mismatch"}


def test_steps_per_round_that_contradict_the_local_epochs_fail(partial_run, tmp_path):
    adapter, schedule, steps_per_round = partial_run
    assert steps_per_round == {"client_0": 2, "client_1": 8, "client_2": 6}
    folder = copy_of(adapter, tmp_path)

    def a_third(record):
        record["steps_per_round"]["client_2"] = 2
        client = record["privacy"]["clients"]["client_2"]
        client["steps"] //= 3
        for entry in client["history"]:
            entry[2] //= 3

    with_schedule(folder, schedule, steps_per_round, a_third)
    report = verify_adapter(folder)
    assert {p.name for p in report.problems} == {"record-steps-off-schedule"}
    assert any("max(1, ceil(local_epochs 1 x 48 examples / batch 8)) gives 6" in p.detail for p in report.problems)


# ----------------------------------------------------------------------------------------
# No guarantee, unreadable files
# ----------------------------------------------------------------------------------------
def test_non_private_adapter_reports_no_guarantee(non_private_adapter, capsys):
    code, out = verify_cli(capsys, non_private_adapter)
    assert code == 0, out
    assert "no differential-privacy guarantee" in out
    assert "independent ε" not in out


def test_non_private_record_whose_card_claims_dp_fails(non_private_adapter, dp_adapter, tmp_path, capsys):
    folder = copy_of(non_private_adapter, tmp_path)
    shutil.copy(dp_adapter / CARD_NAME, folder / CARD_NAME)
    code, out = verify_cli(capsys, folder)
    assert code == 1 and "[card-claims-dp-without-guarantee]" in out


def test_folder_without_a_record_or_card_cannot_be_verified(dp_adapter, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = verify_cli(capsys, empty)
    assert code == 2 and "CANNOT VERIFY" in out and FEDERATED_RECORD_NAME in out

    folder = copy_of(dp_adapter, tmp_path)
    (folder / CARD_NAME).unlink()
    code, out = verify_cli(capsys, folder)
    assert code == 2 and CARD_NAME in out


def test_a_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        verify_adapter(".", tolerance=-0.1)


# ----------------------------------------------------------------------------------------
# A Hub repo id, from the local cache, offline
# ----------------------------------------------------------------------------------------
def test_verify_a_hub_repo_id_from_the_offline_cache(dp_adapter, tmp_path, capsys, monkeypatch):
    assert constants.HF_HUB_OFFLINE  # nothing may be fetched: the cache must answer
    cache = tmp_path / "hub"
    repo = cache / "models--org--dp-adapter"
    good, tampered = "0123456789abcdef0123456789abcdef01234567", "89abcdef0123456789abcdef0123456789abcdef"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(good)
    (repo / "refs" / "tampered").write_text(tampered)
    for commit in (good, tampered):
        shutil.copytree(dp_adapter, repo / "snapshots" / commit)
    epsilon = json.loads((dp_adapter / FEDERATED_RECORD_NAME).read_text())["privacy"]["epsilon"]
    edit_card(repo / "snapshots" / tampered, f"(ε = {format_epsilon(epsilon)}, δ", "(ε = 0.10, δ")

    assert verify_adapter("org/dp-adapter", cache_dir=cache).ok
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the CLI reads the default cache
    code, out = verify_cli(capsys, "org/dp-adapter")
    assert code == 0, out
    code, out = verify_cli(capsys, "org/dp-adapter", "--revision", "tampered")
    assert code == 1 and "[card-epsilon-below-independent]" in out
    code, out = verify_cli(capsys, "org/not-cached")
    assert code == 2


# ----------------------------------------------------------------------------------------
# The independent accountant
# ----------------------------------------------------------------------------------------
def test_independent_epsilon_agrees_with_opacus_prv_within_the_tolerance(dp_adapter):
    """Two accountants, two code bases, one history: PLD and Opacus's PRV agree; Opacus's RDP is never below."""
    record = json.loads((dp_adapter / FEDERATED_RECORD_NAME).read_text())["privacy"]
    histories = [(client["history"], record["delta"]) for client in record["clients"].values()]
    histories += [
        ([[0.9, 0.08, 4], [1.1, 0.08, 4]], 1e-3),  # a history composed from two phases
        ([[0.8123, 16 / 455, 58]], 1e-5),
    ]
    for history, delta in histories:
        pld = independent_epsilon(history, delta)
        prv, rdp = PRVAccountant(), RDPAccountant()
        prv.history = rdp.history = [tuple(entry) for entry in history]
        slack = allowed_shortfall(pld)
        assert abs(prv.get_epsilon(delta=delta) - pld) <= slack, history
        assert rdp.get_epsilon(delta=delta) >= pld - slack, history


def test_independent_epsilon_of_a_full_batch_gaussian_matches_the_analytic_gaussian_mechanism():
    """q = 1: n Gaussian steps at noise sigma are one Gaussian at sigma/sqrt(n); its exact epsilon (Balle & Wang
    2018, Theorem 8) solves delta = Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s)."""
    sigma, steps, delta = 4.0, 9, 1e-5
    s = sigma / math.sqrt(steps)

    def delta_at(eps):
        return norm.cdf(1 / (2 * s) - eps * s) - math.exp(eps) * norm.cdf(-1 / (2 * s) - eps * s) - delta

    exact = brentq(delta_at, 1e-6, 50)
    assert independent_epsilon([[sigma, 1.0, steps]], delta) == pytest.approx(exact, abs=1e-3)
    assert independent_epsilon([[0.0, 0.1, 3]], delta) == math.inf  # no noise: no guarantee
    assert independent_epsilon([], delta) == 0.0
