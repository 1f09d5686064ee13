"""`hf-fedlora verify`: re-derive an adapter's privacy claim with an accountant independent of the one that trained it.

Whoever receives an adapter (a folder or a Hub repo) should not have to trust our numbers.
This reads `federated_training.json` and the model card (`README.md`) from the same place,
recomputes every client's epsilon from its recorded (noise multiplier, sample rate, steps)
history with Google's `dp_accounting` PLD accountant (training uses Opacus), and checks
that the record is consistent (under the example unit: every client of the federation has
an entry, whose sample rate, steps and noise agree with the client sizes, the batch size and
the schedule the record publishes), that the card prints what the record says, and that no
claimed epsilon is below the independent one by more than a stated tolerance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .hub import CARD_NAME, FEDERATED_RECORD_NAME, format_delta, format_epsilon, load_federated_record

# A claimed epsilon may sit below the independent PLD value by at most max(DEFAULT_TOLERANCE, DEFAULT_RELATIVE_TOLERANCE
# * independent). Why this much: the PLD value (pessimistic, discretisation 1e-4) moved by < 1e-4 when the
# discretisation was refined tenfold, so it is as good as exact; Opacus's PRV reports its upper bound, computed to
# eps_error = 0.01, and measured 0.010-0.011 above PLD on every history tried. Two sound accountants can therefore
# differ by about 0.01 either way (one may report an estimate, the other a bound); 0.02 is twice that, and 1% covers
# long compositions where numerical error grows with epsilon. An under-claim larger than this, more than the card's
# own 0.01 rounding step, is reported.
DEFAULT_TOLERANCE = 0.02
DEFAULT_RELATIVE_TOLERANCE = 0.01
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default; pessimistic, so the PLD epsilon is an upper bound
UNITS = {"example": "one training example", "client": "one client"}
EXIT_OK, EXIT_MISMATCH, EXIT_UNREADABLE = 0, 1, 2

_HEADLINE = re.compile(
    r"\(ε = (?P<epsilon>[^,()]+), δ = (?P<delta>[^()]+)\)-differential privacy "
    r"for every (?P<unit>training example|client)"
)
_UNIT_LINE = re.compile(r"\(unit: one (?P<unit>example|client)\)")
_CARD_UNITS = {"training example": "example", "client": "client", "example": "example"}
_NO_GUARANTEE = "no differential-privacy guarantee"
_SEEDED = "the guarantee holds only while that seed stays secret"  # the card's warning for a seeded run
_GROUP_PRIVACY = {
    "example": "Group privacy: a person who contributed k examples is protected only as a group; for k examples "
    "the bound weakens to k·ε (and a larger δ).",
    "client": "Group privacy: a person whose data are held by several clients is protected only as a group.",
}


@dataclass
class Problem:
    """One failed check: a stable name (for scripts and tests) and what exactly did not match."""

    name: str
    detail: str


@dataclass
class VerificationReport:
    """What `verify_adapter` found: the claims it read, the independent epsilons, the problems, the guarantee."""

    source: str
    tolerance: float
    relative_tolerance: float
    error: str | None = None  # set when the files could not be read (exit code 2)
    private: bool | None = None
    record_claim: dict[str, Any] = field(default_factory=dict)  # epsilon, delta, unit, accountant, seeded
    card_claim: dict[str, Any] = field(default_factory=dict)  # epsilons, deltas, units, claims_dp, clients
    independent: dict[str, float] = field(default_factory=dict)  # client -> dp_accounting PLD epsilon
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, or was allowed and why
    guarantee: str = ""
    covers: list[str] = field(default_factory=list)
    not_covered: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return EXIT_UNREADABLE
        return EXIT_OK if not self.problems else EXIT_MISMATCH

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (infinite epsilons as the string "inf"), with `ok` and `exit_code`."""
        data = dataclasses.asdict(self)
        data.update(ok=self.ok, exit_code=self.exit_code)
        return _json_safe(data)


# ----------------------------------------------------------------------------------------
# The independent accountant
# ----------------------------------------------------------------------------------------
def independent_epsilon(history: Sequence[Sequence[float]], delta: float, relation: str = "add_or_remove_one") -> float:
    """Epsilon of a (noise multiplier, sample rate, steps) history with dp_accounting's PLD accountant.

    Each entry is `steps` Poisson-subsampled Gaussian steps (a plain Gaussian when q == 1), under add-or-remove-one
    neighbours, as Opacus accounts DP-SGD; or under replace-one (client-level DP with a public client list: the
    Gaussian at sensitivity twice the clip norm). Cached: PLD takes about a second per history.
    """
    return _pld_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta), relation)


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, relation: str) -> float:
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    neighbours = {
        "add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
        # at sample rate 1 (checked): the Gaussian at sensitivity C, the sum with and without one client's update
        "zero_out_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    }[relation]
    accountant = pld_privacy_accountant.PLDAccountant(neighbours, value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, rate, steps in history:
        if steps == 0 or rate == 0:
            continue  # nothing released, nothing spent
        event = dp_accounting.GaussianDpEvent(sigma)  # sigma == 0 makes it non-private: epsilon = inf
        if rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(rate, event)
        accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


def allowed_shortfall(
    independent: float, tolerance: float = DEFAULT_TOLERANCE, relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE
) -> float:
    """How far a claimed epsilon may sit below the independent one before it is reported."""
    if math.isinf(independent):
        return 0.0
    return max(tolerance, relative_tolerance * independent)


# ----------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------
def verify_adapter(
    path_or_repo_id: str | os.PathLike,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VerificationReport:
    """Check an adapter's record and card against each other and against an independent accountant.

    `path_or_repo_id` is a local folder or a Hub repo id (read through the HF cache, so it works
    offline for cached repos). Never raises for unreadable files: the report's `error` says why
    (exit code 2); failed checks are in `problems` (exit code 1).
    """
    for name, value in (("tolerance", tolerance), ("relative_tolerance", relative_tolerance)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 or math.isinf(value):
            raise ValueError(f"{name} must be a finite number >= 0 (e.g. {name}=0.01), got {value!r}")
    report = VerificationReport(
        source=os.fspath(path_or_repo_id), tolerance=float(tolerance), relative_tolerance=float(relative_tolerance)
    )
    try:
        record, card_text = _read(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
    except (OSError, ValueError, EntryNotFoundError) as error:
        report.error = str(error)
        return report

    privacy = record.get("privacy")
    if not isinstance(privacy, Mapping) or not isinstance(privacy.get("private"), bool):
        report.error = f"{FEDERATED_RECORD_NAME} has no privacy section with a true/false 'private' field"
        return report
    report.private = privacy["private"]
    report.card_claim = _read_card(card_text)
    if report.private:
        _verify_private(report, record, privacy)
    else:
        _verify_non_private(report)
    _state_guarantee(report, record, privacy)
    return report


def _read(
    path_or_repo_id: str | os.PathLike, *, revision: str | None, token: str | None, cache_dir: str | os.PathLike | None
) -> tuple[dict[str, Any], str]:
    """The record and the card's text, from the same folder or the same repo revision."""
    record = load_federated_record(path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir)
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        card_path = os.path.join(path, CARD_NAME)
        if not os.path.isfile(card_path):
            raise FileNotFoundError(f"{path!r} has a {FEDERATED_RECORD_NAME} but no {CARD_NAME} (model card)")
    else:
        try:
            card_path = hf_hub_download(
                path, CARD_NAME, revision=revision, token=token, cache_dir=cache_dir, repo_type="model"
            )
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"{path!r} has no {CARD_NAME} (model card), or it is not in the local cache while offline"
            ) from error
    with open(card_path, encoding="utf-8") as handle:
        return record, handle.read()


def _read_card(text: str) -> dict[str, Any]:
    """The privacy claims a card makes: every (ε, δ, unit) headline, unit lines, DP tag, per-client table."""
    tags: list[str] = []
    if text.startswith("---\n"):
        front, _, _ = text[4:].partition("\n---")
        try:
            metadata = yaml.safe_load(front) or {}
        except yaml.YAMLError:
            metadata = {}
        tags = [str(tag) for tag in (metadata.get("tags") or [])] if isinstance(metadata, dict) else []
    headlines = list(_HEADLINE.finditer(text))
    units = [_CARD_UNITS[m["unit"]] for m in headlines] + [m["unit"] for m in _UNIT_LINE.finditer(text)]
    return {
        "epsilons": [m["epsilon"].strip() for m in headlines],
        "deltas": [m["delta"].strip() for m in headlines],
        "units": sorted(set(units)),
        "dp_tag": "differential-privacy" in tags,
        "claims_dp": bool(headlines or units or "differential-privacy" in tags),
        "says_no_guarantee": _NO_GUARANTEE in text.lower(),
        "says_seeded": _SEEDED in text,
        "clients": _client_table(text),
        "relation": _card_relation(text),
    }


def _card_relation(text: str) -> str | None:
    """The neighbouring relation a client-level card states, if any."""
    for key, words in RELATIONS.items():
        if f"neighbouring relation: {words}" in text:
            return key
    return None


def _client_table(text: str) -> dict[str, dict[str, str]]:
    """Rows of the per-client privacy table (the one with a noise-multiplier column), by client name."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        cells = _cells(line)
        if cells and cells[0] == "Client" and any(c.startswith("Noise multiplier") for c in cells):
            columns = {}
            for key, prefix in (("epsilon", "ε"), ("noise_multiplier", "Noise"), ("sample_rate", "Sample")):
                columns[key] = next((i for i, c in enumerate(cells) if c.startswith(prefix)), None)
            columns["steps"] = next((i for i, c in enumerate(cells) if c.startswith("Steps")), None)
            rows = {}
            for row_line in lines[index + 2 :]:  # skip the |---| line
                row = _cells(row_line)
                if not row:
                    break
                rows[row[0]] = {key: row[i] for key, i in columns.items() if i is not None and i < len(row)}
            return rows
    return {}


def _cells(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith("|"):
        return []
    return [cell.strip() for cell in line.strip("|").split("|")]


def _verify_private(report: VerificationReport, record: Mapping[str, Any], privacy: Mapping[str, Any]) -> None:
    problems = report.problems
    unit, delta, epsilon = privacy.get("unit"), privacy.get("delta"), privacy.get("epsilon")
    report.record_claim = {
        "epsilon": epsilon,
        "delta": delta,
        "unit": unit,
        "accountant": privacy.get("accountant"),
        "seeded": bool(privacy.get("seeded", False)),
    }
    if unit not in UNITS:
        problems.append(
            Problem("record-unknown-unit", f"privacy.unit is {unit!r}; only {sorted(UNITS)} are understood")
        )
    if not _is_number(delta) or not 0 < delta < 1:
        problems.append(Problem("record-malformed", f"privacy.delta must be a number in (0, 1), got {delta!r}"))
        return
    if not _is_number(epsilon) or math.isnan(epsilon):
        problems.append(Problem("record-malformed", f"privacy.epsilon must be a number, got {epsilon!r}"))
        return
    if unit == "client":
        _verify_client_level(report, record, privacy)
        return
    clients = privacy.get("clients")
    if not isinstance(clients, Mapping) or not clients:
        problems.append(Problem("record-malformed", "privacy.clients is empty: no client's epsilon can be re-derived"))
        return
    report.record_claim["clients"] = {
        name: c.get("epsilon") if isinstance(c, Mapping) else None for name, c in clients.items()
    }

    histories = {}
    for name, client in clients.items():
        history = _history(client)
        if history is None:
            problems.append(
                Problem(
                    "record-malformed",
                    f"client {name!r}: epsilon and a history of [noise multiplier >= 0, sample rate in [0, 1], "
                    f"steps >= 0] entries are required, got {client!r}",
                )
            )
            continue
        histories[name] = history
        steps = client.get("steps")
        if steps != sum(n for _, _, n in history):
            problems.append(
                Problem(
                    "record-steps-mismatch",
                    f"client {name!r}: steps = {steps!r} but its history sums to {sum(n for _, _, n in history)}",
                )
            )
    if unit == "example":
        _verify_federation(report, record, clients, histories)
    if len(histories) < len(clients):
        return
    client_epsilons = [clients[name]["epsilon"] for name in clients]
    if not math.isclose(epsilon, max(client_epsilons), rel_tol=1e-9, abs_tol=0.0):
        problems.append(
            Problem(
                "record-epsilon-not-max",
                f"privacy.epsilon = {epsilon} but the largest client epsilon is {max(client_epsilons)}",
            )
        )

    report.independent = {name: independent_epsilon(history, delta) for name, history in histories.items()}
    worst = max(report.independent.values())
    slack = allowed_shortfall(worst, report.tolerance, report.relative_tolerance)
    for name, independent in report.independent.items():
        claimed = clients[name]["epsilon"]
        if claimed < independent - allowed_shortfall(independent, report.tolerance, report.relative_tolerance):
            problems.append(
                Problem(
                    "record-epsilon-below-independent",
                    f"client {name!r}: the record claims epsilon {claimed:.4f}, the independent PLD accountant "
                    f"gives {independent:.4f} for its history",
                )
            )
    if epsilon < worst - slack:
        problems.append(
            Problem(
                "record-epsilon-below-independent",
                f"privacy.epsilon = {epsilon:.4f}, the independent PLD accountant gives {worst:.4f} (largest client)",
            )
        )
    _verify_card_against_private_record(report, clients, unit, delta, epsilon, worst)


def _verify_card_against_private_record(
    report: VerificationReport,
    clients: Mapping[str, Mapping[str, Any]],
    unit: Any,
    delta: float,
    epsilon: float,
    worst: float,
) -> None:
    card, problems = report.card_claim, report.problems
    if not card["epsilons"]:
        problems.append(
            Problem("card-missing-claim", f"the record is private but {CARD_NAME} states no (ε, δ) guarantee")
        )
    expected_epsilon, expected_delta = format_epsilon(epsilon), format_delta(delta)
    for printed in sorted(set(card["epsilons"])):
        if printed != expected_epsilon:
            problems.append(
                Problem(
                    "card-epsilon-mismatch",
                    f"the card states ε = {printed}; the record's epsilon {epsilon} rounded up is {expected_epsilon}",
                )
            )
        value = _card_number(printed)
        if value is not None and value < worst - allowed_shortfall(worst, report.tolerance, report.relative_tolerance):
            problems.append(
                Problem(
                    "card-epsilon-below-independent",
                    f"the card states ε = {printed}, the independent PLD accountant gives {worst:.4f}",
                )
            )
    for printed in sorted(set(card["deltas"])):
        if _card_number(printed) != float(expected_delta):
            problems.append(
                Problem("card-delta-mismatch", f"the card states δ = {printed}; the record's delta is {delta}")
            )
    if card["units"] and card["units"] != [unit]:
        problems.append(
            Problem("card-unit-mismatch", f"the card's unit is {' and '.join(card['units'])}; the record's is {unit}")
        )
    if card["epsilons"] and not card["units"]:
        problems.append(Problem("card-unit-mismatch", f"the card names no unit; the record's is {unit}"))
    if report.record_claim["seeded"] != card["says_seeded"]:
        problems.append(
            Problem(
                "card-seeded-mismatch",
                "the record says the DP randomness came from a secret seed but the card does not warn that the "
                "guarantee holds only while that seed stays secret"
                if report.record_claim["seeded"]
                else "the card says the DP randomness came from a secret seed; the record says it did not",
            )
        )

    table = card["clients"]
    if unit == "client":  # one mechanism for the federation: no per-client table to check (there must be none)
        if table:
            problems.append(Problem("card-client-mismatch", "a client-level card lists clients"))
        return
    if not table:
        problems.append(Problem("card-client-mismatch", "the card has no per-client privacy table"))
        return
    for name in sorted(set(table) - set(clients)):
        problems.append(Problem("card-client-mismatch", f"the card lists client {name!r}, the record does not"))
    for name, client in clients.items():
        row = table.get(name)
        if row is None:
            problems.append(Problem("card-client-mismatch", f"client {name!r} is missing from the card's table"))
            continue
        printed, expected = row.get("epsilon"), format_epsilon(client["epsilon"])
        if printed != expected:
            problems.append(
                Problem(
                    "card-epsilon-mismatch",
                    f"client {name!r}: the card states ε = {printed}; the record's {client['epsilon']} rounded up "
                    f"is {expected}",
                )
            )
        value, independent = _card_number(printed), report.independent[name]
        if value is not None and value < independent - allowed_shortfall(
            independent, report.tolerance, report.relative_tolerance
        ):
            problems.append(
                Problem(
                    "card-epsilon-below-independent",
                    f"client {name!r}: the card states ε = {printed}, the independent PLD accountant gives "
                    f"{independent:.4f}",
                )
            )
        for key in ("noise_multiplier", "sample_rate", "steps"):
            shown, recorded = _card_number(row.get(key)), client.get(key)
            if _is_number(recorded) and (shown is None or not math.isclose(shown, recorded, rel_tol=1e-3)):
                problems.append(
                    Problem(
                        "card-client-mismatch",
                        f"client {name!r}: the card shows {key} {row.get(key)!r}, the record {recorded!r}",
                    )
                )


# ----------------------------------------------------------------------------------------
# Client-level DP (DP-FedAvg): one history for the federation, nothing about who took part
# ----------------------------------------------------------------------------------------
RELATIONS = {
    "add_or_remove_one": "add or remove one client",
    "replace_one": "replace one client",
    "zero_out_one": "zero out one client's data",
}
# What a client-level record must never hold: it would say which clients there are or who took part.
_PARTICIPATION_KEYS = ("client_sizes", "schedule", "steps_per_round", "failed_clients")


def _verify_client_level(report: VerificationReport, record: Mapping[str, Any], privacy: Mapping[str, Any]) -> None:
    """The federation's one history re-derived independently under its neighbouring relation; q against the
    expected count and the population; nothing published about who took part; the card against the record."""
    problems = report.problems
    relation = privacy.get("neighbouring_relation")
    report.record_claim["neighbouring_relation"] = relation
    if relation not in RELATIONS:
        problems.append(
            Problem("record-malformed", f"privacy.neighbouring_relation is {relation!r}; expected {sorted(RELATIONS)}")
        )
        return
    history = _history({"epsilon": privacy["epsilon"], "history": privacy.get("history")})
    if history is None or not history:
        problems.append(Problem("record-malformed", "privacy.history must be a list of [sigma, q, rounds] entries"))
        return
    rounds = sum(n for _, _, n in history)
    if privacy.get("rounds") != rounds:
        problems.append(
            Problem(
                "record-steps-mismatch", f"privacy.rounds = {privacy.get('rounds')!r}, its history sums to {rounds}"
            )
        )
    ran = record.get("rounds")
    continued = isinstance(record.get("continued_from"), Mapping) and not record["continued_from"].get(
        "new_privacy_budget"
    )
    if not _is_int(ran) or (rounds != ran if not continued else rounds < ran):
        problems.append(
            Problem(
                "record-steps-off-schedule",
                f"the run ran {ran!r} rounds but its privacy history accounts {rounds}: every round is one step",
            )
        )
    expected, population = privacy.get("expected_clients_per_round"), record.get("num_clients")
    rate = privacy.get("sample_rate")
    if not (_is_number(expected) and _is_int(population) and population > 0 and _is_number(rate)):
        problems.append(
            Problem("record-malformed", "a client-level record needs num_clients, sample_rate and the expected count")
        )
    else:
        this_run = history[-1:] if continued else history
        if not math.isclose(rate, expected / population, rel_tol=1e-9) or any(
            not math.isclose(q, rate, rel_tol=1e-9) for _, q, _ in this_run
        ):
            problems.append(
                Problem(
                    "record-sample-rate-mismatch",
                    f"the client rate must be the expected count over the population, {expected}/{population}; the "
                    f"record says {rate} and its history {[q for _, q, _ in this_run]}",
                )
            )
        if relation in ("replace_one", "zero_out_one") and any(q != 1 for _, q, _ in history):
            problems.append(
                Problem("record-sample-rate-mismatch", f"{relation} is accounted for full participation only (q = 1)")
            )
    if privacy.get("noise_multiplier") != history[-1][0]:
        problems.append(
            Problem(
                "record-noise-mismatch",
                f"privacy.noise_multiplier = {privacy.get('noise_multiplier')!r}, its history's last sigma is "
                f"{history[-1][0]}",
            )
        )
    leaked = [key for key in _PARTICIPATION_KEYS if record.get(key)]
    leaked += ["privacy.clients"] if privacy.get("clients") else []
    leaked += ["round_history[].clients"] if any("clients" in e for e in record.get("round_history") or []) else []
    if leaked:
        problems.append(
            Problem(
                "record-publishes-participants",
                f"a client-level record publishes {', '.join(leaked)}: who took part (or how many) must stay secret",
            )
        )
    independent = independent_epsilon(history, privacy["delta"], relation)
    report.independent = {"federation": independent}
    report.record_claim["clients"] = {"federation": privacy["epsilon"]}
    if privacy["epsilon"] < independent - allowed_shortfall(independent, report.tolerance, report.relative_tolerance):
        problems.append(
            Problem(
                "record-epsilon-below-independent",
                f"privacy.epsilon = {privacy['epsilon']:.4f}, the independent PLD accountant ({relation}) gives "
                f"{independent:.4f}",
            )
        )
    _verify_card_against_private_record(report, {}, "client", privacy["delta"], privacy["epsilon"], independent)
    if report.card_claim.get("relation") not in (None, relation):
        problems.append(
            Problem(
                "card-relation-mismatch",
                f"the card's neighbouring relation is {report.card_claim['relation']!r}; the record's is {relation!r}",
            )
        )


# ----------------------------------------------------------------------------------------
# The privacy entries against the federation the record describes (example unit)
# ----------------------------------------------------------------------------------------
@dataclass
class _Federation:
    """What the rest of the record says about the run: who took part, with how many examples, for how many steps."""

    sizes: dict[str, int]  # client -> examples
    batch_size: int  # the logical (expected Poisson) batch: q = batch_size / n
    rounds: int
    sub_rounds: int  # local passes per round (DEeR's deviation eliminator: two)
    steps_per_round: dict[str, int]  # client -> local steps per (sub-)round
    participation: dict[str, int] | None  # client -> rounds it took part in; None: not recorded
    scheduled_names: set[str]  # every client a recorded schedule names
    failed_rounds: dict[str, int]  # client -> rounds in which it failed (and may have run fewer steps)
    composed: bool  # every history starts with an earlier run's entries


def _verify_federation(
    report: VerificationReport,
    record: Mapping[str, Any],
    clients: Mapping[str, Any],
    histories: Mapping[str, list[tuple[float, float, int]]],
) -> None:
    """Example unit: every client of the federation has a privacy entry, and each entry agrees with the federation.

    A record that leaves out its worst client, or whose history was rescaled, can be consistent with its own
    epsilons and its card; it still contradicts the client sizes, the batch size and the schedule it publishes.
    """
    problems = report.problems
    federation = _read_federation(record, problems, report.notes)
    if federation is None:
        return
    for name in sorted((set(federation.sizes) | federation.scheduled_names) - set(clients)):
        problems.append(
            Problem(
                "record-client-missing",
                f"client {name!r} is part of the federation (client_sizes or schedule) but has no entry in "
                "privacy.clients: its epsilon, possibly the largest, is not accounted",
            )
        )
    if not federation.composed:  # a composed earlier run's clients keep their entries without being in this run
        for name in sorted(set(clients) - set(federation.sizes)):
            problems.append(
                Problem(
                    "record-client-unknown",
                    f"privacy.clients has an entry for {name!r}, which client_sizes does not list (and the run "
                    "continued no earlier run whose clients it could be)",
                )
            )
    for name, size in federation.sizes.items():
        client, history = clients.get(name), histories.get(name)
        if not isinstance(client, Mapping) or history is None:
            continue  # missing (reported above) or malformed (reported by the caller)
        if client.get("num_examples") != size:
            problems.append(
                Problem(
                    "record-size-mismatch",
                    f"client {name!r}: privacy.clients says {client.get('num_examples')!r} examples, client_sizes "
                    f"says {size}",
                )
            )
        scheduled = _scheduled_steps(federation, name)
        # The entries this run added: a fresh run's whole history; after an earlier run, the last entry if this
        # run gave the client steps (the earlier entries may have run at another batch size or noise).
        if not federation.composed:
            this_run = history
        else:
            this_run = history[-1:] if scheduled else []
        _check_sample_rate(problems, name, client, this_run, federation)
        _check_steps(report, name, history, scheduled, federation)
        _check_noise_multiplier(report, name, client, this_run, federation.composed)


def _read_federation(record: Mapping[str, Any], problems: list[Problem], notes: list[str]) -> _Federation | None:
    """The federation's facts from the record, or None (with a problem) where they are missing or malformed."""
    sizes = record.get("client_sizes")
    if not isinstance(sizes, Mapping) or not sizes or not all(_is_int(n) and n > 0 for n in sizes.values()):
        problems.append(
            Problem(
                "record-malformed",
                f"client_sizes must give every client's number of examples (> 0), got {sizes!r}: without it nobody "
                "can check that every client of the federation has a privacy entry",
            )
        )
        return None
    numbers = {key: record.get(key) for key in ("num_clients", "clients_per_round", "rounds", "batch_size")}
    wrong = [
        f"{key} = {value!r}"
        for key, value in numbers.items()
        if not _is_int(value) or value < (0 if key == "rounds" else 1)
    ]
    local_steps, local_epochs, method = record.get("local_steps"), record.get("local_epochs"), record.get("method")
    if local_steps is not None and not (_is_int(local_steps) and local_steps >= 1):
        wrong.append(f"local_steps = {local_steps!r}")
    if local_epochs is not None and not (_is_number(local_epochs) and local_epochs > 0):
        wrong.append(f"local_epochs = {local_epochs!r}")
    if not isinstance(method, Mapping) or not isinstance(method.get("method"), str):
        wrong.append(f"method = {method!r}")
    if not wrong and numbers["clients_per_round"] > numbers["num_clients"]:
        wrong.append(f"clients_per_round = {numbers['clients_per_round']} > num_clients = {numbers['num_clients']}")
    if wrong:
        problems.append(
            Problem(
                "record-malformed",
                "the federation's "
                + ", ".join(wrong)
                + ": num_clients, clients_per_round and batch_size must be integers >= 1, rounds >= 0, local_steps an "
                "integer >= 1 or null, local_epochs a number > 0 or null, method an object naming the method; "
                "without them nobody can check the privacy entries against the run",
            )
        )
        return None
    sizes = {str(name): int(n) for name, n in sizes.items()}
    num_clients, per_round, rounds = numbers["num_clients"], numbers["clients_per_round"], numbers["rounds"]
    if num_clients != len(sizes):
        problems.append(
            Problem(
                "record-client-missing" if num_clients > len(sizes) else "record-client-unknown",
                f"num_clients = {num_clients} but client_sizes lists {len(sizes)} clients",
            )
        )
    continued = record.get("continued_from")
    federation = _Federation(
        sizes=sizes,
        batch_size=numbers["batch_size"],
        rounds=rounds,
        sub_rounds=_sub_rounds(record, method, rounds, problems),
        steps_per_round=_steps_per_round(record, sizes, numbers["batch_size"], problems),
        participation=None,
        scheduled_names=set(),
        failed_rounds=_failed_rounds(record, rounds),
        composed=isinstance(continued, Mapping) and not continued.get("new_privacy_budget"),
    )
    schedule = record.get("schedule")
    if schedule is not None:
        _read_schedule(federation, schedule, per_round, problems)
    elif per_round >= num_clients:
        federation.participation = dict.fromkeys(sizes, rounds)  # every client in every round
    else:
        notes.append(
            f"The record does not say which clients took part in which round ({per_round} of {num_clients} per "
            "round): each client's steps were only checked against the most it could have run."
        )
    return federation


# Local passes per round of the methods this release knows (DEeR's deviation eliminator: B, then A).
_KNOWN_SUB_ROUNDS = {"lora": 1, "ffa_lora": 1, "rolora": 1, "la_lora": 1, "deer": 2, "fedsvd": 1}


def _sub_rounds(record: Mapping[str, Any], method: Mapping[str, Any], rounds: int, problems: list[Problem]) -> int:
    """Local passes per round: the record's `sub_rounds_per_round` (the same every round), checked against the rule
    of a method this release knows; older records without it, the rule alone."""
    name = method["method"]
    known = _KNOWN_SUB_ROUNDS.get(name)
    if name == "deer" and method.get("deviation_eliminator") is not True:
        known = 1
    recorded = record.get("sub_rounds_per_round")
    if recorded is None:
        return known if known is not None else 1
    if not (isinstance(recorded, list) and len(recorded) == rounds and len(set(recorded)) <= 1):
        problems.append(
            Problem("record-malformed", f"sub_rounds_per_round must list one count per round, got {recorded!r}")
        )
        return known if known is not None else 1
    value = recorded[0] if recorded else (known or 1)
    if not _is_int(value) or value < 1 or (known is not None and value != known):
        problems.append(
            Problem(
                "record-schedule-mismatch",
                f"sub_rounds_per_round says {value!r} local passes a round; method {name!r} runs {known}",
            )
        )
        return known if known is not None else 1
    return value


def _steps_per_round(
    record: Mapping[str, Any], sizes: Mapping[str, int], batch_size: int, problems: list[Problem]
) -> dict[str, int]:
    """Each client's local steps per (sub-)round, as the trainer derives them; a recorded value must agree."""
    local_steps, local_epochs = record.get("local_steps"), record.get("local_epochs")
    expected, how = {}, {}
    for name, size in sizes.items():
        if local_steps is not None:
            expected[name], how[name] = local_steps, f"local_steps = {local_steps}"
        else:
            epochs = local_epochs if local_epochs is not None else 1.0
            expected[name] = max(1, math.ceil(epochs * size / batch_size))
            how[name] = f"max(1, ceil(local_epochs {epochs:g} x {size} examples / batch {batch_size}))"
    recorded = record.get("steps_per_round")
    if recorded is None:
        return expected
    if not isinstance(recorded, Mapping):
        problems.append(Problem("record-malformed", f"steps_per_round must map clients to steps, got {recorded!r}"))
        return expected
    for name, steps in expected.items():
        if recorded.get(name) != steps:
            problems.append(
                Problem(
                    "record-steps-off-schedule",
                    f"client {name!r}: steps_per_round says {recorded.get(name)!r} local steps per (sub-)round; "
                    f"{how[name]} gives {steps}",
                )
            )
    return expected


def _read_schedule(federation: _Federation, schedule: Any, per_round: int, problems: list[Problem]) -> None:
    """Participants per round ({"1": [names], ...}): known clients, clients_per_round of them, every round run."""
    if not isinstance(schedule, Mapping):
        problems.append(Problem("record-malformed", f"schedule must map rounds to participants, got {schedule!r}"))
        return
    participation = dict.fromkeys(federation.sizes, 0)
    for round_number in range(1, federation.rounds + 1):  # rounds planned but not run (training stopped) don't count
        names = schedule.get(str(round_number))
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            problems.append(
                Problem("record-schedule-mismatch", f"schedule has no list of participants for round {round_number}")
            )
            continue
        federation.scheduled_names.update(names)
        unknown = sorted(set(names) - set(federation.sizes))
        if unknown:
            problems.append(
                Problem(
                    "record-schedule-mismatch",
                    f"round {round_number}: the schedule names {unknown}, which client_sizes does not list",
                )
            )
        if len(set(names)) != len(names) or len(names) != per_round:
            problems.append(
                Problem(
                    "record-schedule-mismatch",
                    f"round {round_number}: the schedule lists {names}, not {per_round} distinct clients "
                    f"(clients_per_round = {per_round})",
                )
            )
        for name in set(names) & set(participation):
            participation[name] += 1
    federation.participation = participation


def _failed_rounds(record: Mapping[str, Any], rounds: int) -> dict[str, int]:
    """Rounds in which a client failed part-way (the trainer's failed_clients, a Flower round's failed_clients)."""
    failed: set[tuple[int, str]] = set()
    listed = record.get("failed_clients")
    if isinstance(listed, Mapping):
        for round_number, names in listed.items():
            if str(round_number).isdigit() and isinstance(names, list):
                failed.update((int(round_number), str(name)) for name in names)
    for entry in record.get("round_history") or []:
        if isinstance(entry, Mapping) and _is_int(entry.get("round")) and isinstance(entry.get("failed_clients"), list):
            failed.update((entry["round"], str(name)) for name in entry["failed_clients"])
    counts: dict[str, int] = {}
    for round_number, name in failed:
        if 1 <= round_number <= rounds:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _scheduled_steps(federation: _Federation, name: str) -> int | None:
    """DP-SGD steps the schedule gives a client in this run; None when the schedule was not recorded."""
    if federation.participation is None:
        return None
    return federation.participation.get(name, 0) * federation.steps_per_round[name] * federation.sub_rounds


def _check_sample_rate(
    problems: list[Problem],
    name: str,
    client: Mapping[str, Any],
    this_run: Sequence[tuple[float, float, int]],
    federation: _Federation,
) -> None:
    """q = batch_size / n: the record's sample rate and every history entry of this run."""
    size = federation.sizes[name]
    expected = federation.batch_size / size
    rates = [("sample_rate", client.get("sample_rate"))]
    if federation.composed:
        rates += [("the last history entry's q", q) for _, q, _ in this_run]
    else:
        rates += [(f"history[{index}]'s q", q) for index, (_, q, _) in enumerate(this_run)]
    wrong = [
        f"{where} = {rate!r}"
        for where, rate in rates
        if not _is_number(rate) or not math.isclose(rate, expected, rel_tol=1e-9, abs_tol=0.0)
    ]
    if wrong:
        problems.append(
            Problem(
                "record-sample-rate-mismatch",
                f"client {name!r}: {', '.join(wrong)}, but its sample rate is batch_size {federation.batch_size} / "
                f"{size} examples = {expected:.6g}",
            )
        )


def _check_steps(
    report: VerificationReport,
    name: str,
    history: Sequence[tuple[float, float, int]],
    scheduled: int | None,
    federation: _Federation,
) -> None:
    """The steps in the history against those the schedule gave the client (rounds x steps x sub-rounds)."""
    total = sum(n for _, _, n in history)
    per_round = federation.steps_per_round[name] * federation.sub_rounds
    how = f"{federation.steps_per_round[name]} local steps x {federation.sub_rounds} (sub-)round(s)"
    if scheduled is None:  # who took part was not recorded: at most every round
        most = federation.rounds * per_round
        if not federation.composed and total > most:
            report.problems.append(
                Problem(
                    "record-steps-off-schedule",
                    f"client {name!r}: its history has {total} steps, more than {federation.rounds} rounds x {how} "
                    f"= {most}",
                )
            )
        return
    failed = federation.failed_rounds.get(name, 0)
    least = scheduled - failed * per_round  # a client that failed inside a round ran only part of it
    rounds = (federation.participation or {}).get(name, 0)
    said = f"{rounds} scheduled round(s) x {how} = {scheduled}" + (
        f", less up to {failed * per_round} for the {failed} round(s) it failed in" if failed else ""
    )
    if total < least:
        earlier = ", including an earlier run's steps," if federation.composed else ""
        report.problems.append(
            Problem(
                "record-steps-off-schedule",
                f"client {name!r}: its history{earlier} has {total} steps, fewer than the schedule gives it ({said})",
            )
        )
    elif total > scheduled and not federation.composed:
        report.notes.append(
            f"Client {name!r}'s history has {total} steps, more than the {scheduled} scheduled ({said}): a run resumed "
            "after a crash counts again the steps the crash cut short. Its ε is re-derived from all of them."
        )


def _check_noise_multiplier(
    report: VerificationReport,
    name: str,
    client: Mapping[str, Any],
    this_run: Sequence[tuple[float, float, int]],
    composed: bool,
) -> None:
    """The noise multiplier the record (and the card's table) shows is the one the history's last steps ran at."""
    if not this_run:
        return  # no step in this run: the recorded noise multiplier was never used
    shown, last = client.get("noise_multiplier"), this_run[-1][0]
    if not _is_number(shown) or not math.isclose(shown, last, rel_tol=1e-9, abs_tol=0.0):
        report.problems.append(
            Problem(
                "record-noise-mismatch",
                f"client {name!r}: noise_multiplier (the card's σ) is {shown!r}, but its history's "
                f"{'last ' if len(this_run) > 1 or composed else ''}steps ran at σ = {last}",
            )
        )
    earlier = sorted({sigma for sigma, _, _ in this_run[:-1]} - {last})
    if earlier:
        report.notes.append(
            f"Client {name!r}'s history ran at σ = {', '.join(f'{s:g}' for s in earlier)} before σ = {last:g}: a run "
            "resumed after a crash recalibrates the noise for the steps left. Its ε is re-derived from every entry."
        )


def _verify_non_private(report: VerificationReport) -> None:
    report.record_claim = {"epsilon": None, "delta": None, "unit": None, "accountant": None, "seeded": False}
    card = report.card_claim
    if card["claims_dp"]:
        claims = _claimed_pairs(card)
        if card["dp_tag"]:
            claims.append("the 'differential-privacy' tag")
        claims += [f"unit: one {unit}" for unit in card["units"]]
        problems = "; ".join(dict.fromkeys(claims))
        report.problems.append(
            Problem(
                "card-claims-dp-without-guarantee",
                f"the record says the run was not private, but the card claims differential privacy: {problems}",
            )
        )


def _state_guarantee(report: VerificationReport, record: Mapping[str, Any], privacy: Mapping[str, Any]) -> None:
    """The plain-language statement: what the guarantee covers and what it does not."""
    if not report.private:
        report.guarantee = (
            f"This adapter has {_NO_GUARANTEE}: it was trained without DP-SGD (no clipping, no noise). "
            "Its weights, the clients' updates and the published statistics may reveal individual training examples."
        )
        report.not_covered = ["Nothing is covered: there is no differential-privacy guarantee."]
        return
    unit = privacy.get("unit")
    epsilon, delta = privacy.get("epsilon"), privacy.get("delta")
    shown = (
        f"(ε = {format_epsilon(epsilon)}, δ = {format_delta(delta)})"
        if _is_number(epsilon) and _is_number(delta)
        else "(unreadable ε, δ)"
    )
    if unit == "example":
        report.guarantee = (
            f"{shown}-differential privacy for every training example of every client (unit: one example): adding "
            "or removing one training example changes the probability of any outcome of training (the adapter "
            "weights and every update a client sent) by at most a factor e^ε, except with probability δ."
        )
    elif unit == "client":
        change = {
            "replace_one": "replacing all of one client's data by another's",
            "zero_out_one": "removing all of one client's data (the client staying, with a zero update)",
        }.get(privacy.get("neighbouring_relation"), "adding or removing one client")
        report.guarantee = (
            f"{shown}-differential privacy for every client (unit: one client; neighbouring relation: "
            f"{RELATIONS.get(privacy.get('neighbouring_relation'), '?')}): {change} changes the probability of any "
            "outcome of training (the released adapter) by at most a factor e^ε, except with probability δ."
        )
        _state_client_level(report, record, privacy)
        return
    else:
        report.guarantee = f"No guarantee can be stated: the record's privacy unit {unit!r} is not understood."
        return
    clients = privacy.get("clients") if isinstance(privacy.get("clients"), Mapping) else {}
    per_client = [
        f"{name}: claimed ε = {format_epsilon(c['epsilon'])}, independent ε = {report.independent[name]:.4f}"
        for name, c in clients.items()
        if name in report.independent and _is_number(c.get("epsilon"))
    ]
    report.covers = [
        f"Each client's data, by its own ε over every step it ran (δ = {format_delta(delta)} for every client); the "
        "clients' data are disjoint, so the run's ε is the largest client ε.",
        *per_client,
        "The released adapter weights and every update a client sent to the server.",
    ]
    published = ["the per-client example counts (treated as public, as in standard DP-SGD: they set q and σ)"]
    if record.get("client_label_histograms"):
        published.append("the per-client label histograms")
    if any("train_loss" in entry for entry in record.get("round_history") or [] if isinstance(entry, Mapping)):
        published.append("the per-round training losses")
    report.not_covered = [
        "Evaluation data: any evaluation metrics were computed on held-out data without noise.",
        "Statistics published without noise in the card and the record: " + ", ".join(published) + ".",
        _GROUP_PRIVACY[unit],
        "The base model and its pretraining data.",
    ]
    if report.record_claim.get("seeded"):
        report.not_covered.insert(
            0,
            f"The DP randomness (batch sampling and noise) came from a user's secret seed: {_SEEDED}.",
        )
    _state_continuation(report, record.get("continued_from"))


def _state_client_level(report: VerificationReport, record: Mapping[str, Any], privacy: Mapping[str, Any]) -> None:
    independent = report.independent.get("federation")
    shown = f", independent ε = {independent:.4f}" if independent is not None else ""
    report.covers = [
        f"Every client's data as a whole, by the federation's one history (DP-FedAvg: each sampled client's update "
        f"clipped, the noise added once to the sum, divided by a fixed expected count){shown}.",
        "The released adapter weights and everything published with them (this record and card).",
    ]
    if privacy.get("noise_placement") == "distributed":
        report.covers[0] += (
            " Distributed noise: each client added its share of discrete Gaussian noise before a secure sum; the "
            "independent figure is the Gaussian mechanism's at the recorded sigma, a lower bound, and the record's "
            "epsilon adds the rounding and the discrete sum (docs/algorithms.md#distributed-noise)."
        )
        trust = "The clients: each was trusted to clip its update and add its noise share" + (
            "; the secure sum was simulated in one process, which saw every encoded upload."
            if privacy.get("secure_sum") == "simulated in process"
            else "; the aggregator saw only masked uploads and their sum (honest-but-curious)."
        )
    else:
        trust = "The aggregator: it saw the clipped updates before the noise (central DP)."
    report.not_covered = [
        trust,
        "Evaluation data: any evaluation metrics were computed on held-out data without noise.",
        _GROUP_PRIVACY["client"],
        "The base model and its pretraining data.",
    ]
    if record.get("unprotected_statistics_published"):
        report.not_covered.insert(2, "Statistics published on request without noise (label histograms, losses).")
    if report.record_claim.get("seeded"):
        report.not_covered.insert(0, f"The DP randomness came from a user's secret seed: {_SEEDED}.")
    _state_continuation(report, record.get("continued_from"))


def _state_continuation(report: VerificationReport, continued: Any) -> None:
    """An adapter trained further from an earlier run: either that run's spend is composed in, or it is not."""
    if not isinstance(continued, Mapping):
        return
    if not continued.get("new_privacy_budget"):
        earlier = continued.get("epsilon")
        earlier = f" (that run's ε was {format_epsilon(earlier)})" if _is_number(earlier) else ""
        report.covers.append(
            f"This adapter continued an earlier run: its recorded history is composed into each client's history, "
            f"so ε includes what that run spent{earlier}."
        )
        return
    earlier = "an earlier run" if continued.get("recorded") else "an earlier, unrecorded training"
    if continued.get("recorded") and continued.get("private") is False:
        earlier = "an earlier run without differential privacy"
    report.not_covered.insert(
        0,
        f"This adapter continued {earlier} with a new privacy budget: what that training spent is NOT in ε. The "
        "guarantee holds only if this run's data are disjoint from the data it was trained on before, and says "
        "nothing about those earlier data.",
    )


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------
def format_report(report: VerificationReport) -> str:
    """The report as plain text: verdict, claims, independent epsilons, problems, what is and is not covered."""
    lines = [f"Verifying {report.source}"]
    if report.error is not None:
        lines += [f"CANNOT VERIFY (exit code {EXIT_UNREADABLE}): {report.error}"]
        return "\n".join(lines)
    if report.private:
        record = report.record_claim
        lines.append(
            f"Record ({FEDERATED_RECORD_NAME}): ε = {record['epsilon']}, δ = {record['delta']}, unit: "
            f"{record['unit']}, {str(record['accountant']).upper()} accountant"
        )
    else:
        lines.append(f"Record ({FEDERATED_RECORD_NAME}): not private, {_NO_GUARANTEE}")
    card = report.card_claim
    if card.get("claims_dp"):
        pairs = ", ".join(_claimed_pairs(card))
        lines.append(f"Card ({CARD_NAME}): {pairs or 'no (ε, δ)'}, unit: {', '.join(card['units']) or 'none named'}")
    else:
        lines.append(f"Card ({CARD_NAME}): claims no differential privacy")
    if report.independent:
        lines.append(
            f"Independent accountant: Google dp_accounting, PLD "
            f"({(report.record_claim.get('neighbouring_relation') or 'add_or_remove_one').replace('_', '-')}, "
            "Poisson-subsampled Gaussian, "
            f"discretisation {PLD_DISCRETIZATION:g}). Tolerance: {_tolerance_text(report)}."
        )
        lines.append(f"  {'client':<16} {'record ε':>10} {'card ε':>8} {'independent ε':>14}")
        table = card.get("clients") or {}
        recorded = report.record_claim.get("clients") or {}
        for name, value in report.independent.items():
            claimed = recorded.get(name)
            claimed = f"{claimed:.4f}" if _is_number(claimed) else "-"
            shown = (table.get(name) or {}).get("epsilon", "-")
            lines.append(f"  {name:<16} {claimed:>10} {shown:>8} {value:>14.4f}")
    lines += [f"Note: {note}" for note in report.notes]
    tolerance = f" (tolerance: {_tolerance_text(report)})" if report.private else ""
    if report.ok:
        lines.append(f"RESULT: OK, every check passed{tolerance} (exit code 0).")
    else:
        lines.append(f"RESULT: FAILED, {len(report.problems)} problem(s){tolerance} (exit code {EXIT_MISMATCH}):")
        lines += [f"  - [{p.name}] {p.detail}" for p in report.problems]
    lines += ["", "What the guarantee covers:" if report.private else "Guarantee:", f"  {report.guarantee}"]
    lines += [f"  - {item}" for item in report.covers]
    if report.not_covered:
        lines.append("What it does not cover:")
        lines += [f"  - {item}" for item in report.not_covered]
    return "\n".join(lines)


def _tolerance_text(report: VerificationReport) -> str:
    """How far a claimed ε may sit below the independent one, said in the accountant's line and in the verdict."""
    return (
        f"a claimed ε may sit below the independent PLD ε by at most max({report.tolerance:g}, "
        f"{report.relative_tolerance * 100:g}% of it)"
    )


def format_report_json(report: VerificationReport) -> str:
    """The report as JSON (what `hf-fedlora verify --json` prints), for scripts and CI."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
def _history(client: Any) -> list[tuple[float, float, int]] | None:
    """A client's history as (sigma, q, steps) triples, or None if it (or its epsilon) is malformed."""
    if not isinstance(client, Mapping) or not _is_number(client.get("epsilon")) or math.isnan(client["epsilon"]):
        return None
    history = client.get("history")
    if not isinstance(history, list):
        return None
    triples = []
    for entry in history:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not all(_is_number(x) for x in entry):
            return None
        sigma, rate, steps = entry
        if not (sigma >= 0 and 0 <= rate <= 1 and steps >= 0 and float(steps).is_integer()):
            return None
        triples.append((float(sigma), float(rate), int(steps)))
    return triples


def _claimed_pairs(card: Mapping[str, Any]) -> list[str]:
    """The distinct "(ε = X, δ = Y)" claims of a card, in order of appearance."""
    pairs = zip(card["epsilons"], card["deltas"], strict=True)
    return list(dict.fromkeys(f"(ε = {epsilon}, δ = {delta})" for epsilon, delta in pairs))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _card_number(text: str | None) -> float | None:
    if text is None:
        return None
    if text.strip() == "∞":
        return math.inf
    try:
        return float(text)
    except ValueError:
        return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
