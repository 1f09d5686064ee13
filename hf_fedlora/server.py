"""The server half of a federation, written once: both transports (in process, Flower) drive this object.

A `Federation` plans (each client's steps, the participants of every round, the privacy plan), runs each round's
sub-rounds through a client runner, applies one min-clients rule, aggregates (the method's FedAvg, streaming when the
method allows; under client-level DP, DP-FedAvg with the noise added once here), and keeps the account of privacy
that the record publishes. It never sees an example: a runner hands it each client's release.

A runner is anything with
- `plan(requests) -> {name: plan reply}`: under the example unit each client calibrates its own noise (against what
  its examples already spent) for the steps the server planned, and replies with it (`FederatedPrivacy.plan_reply`);
- `run(names, round_index, sub_round, steps, global_state, progress) -> iterator of (name, ClientRelease or
  ClientFailure)`: the clients' rounds from the global state, yielded as they finish (so aggregation can stream).
In process the runner is the trainer's client round (`FederatedTrainer.local_round`); under Flower it is a Grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from transformers.utils import logging

from .federation.adapter_state import parameters_of
from .federation.secure_mean import SecureMeanEncoding, SecureMeanSum
from .methods.base import FederatedMethod
from .privacy.client_level import SIMULATED_SECURE_SUM, ClientLevelPrivacy
from .privacy.scheduled import ScheduledAccounts

logger = logging.get_logger(__name__)


@dataclass
class ClientFacts:
    """What the server may know of a client under the example unit (sizes are public there: they set q)."""

    num_examples: int
    local_steps: int  # per (sub-)round


@dataclass
class ClientRelease:
    upload: dict[str, torch.Tensor] | None  # None: the client ran no step
    losses: list[float] = field(default_factory=list)  # empty under DP unless published on request
    privacy: dict[str, Any] | None = None  # the client's own report (example unit), checked against the server's


@dataclass
class ClientFailure:
    reason: str


@dataclass
class SecureSumRelease:
    """A secure sum's result (a transport that sums the encoded uploads securely yields it once per sub-round,
    after the clients' own releases, which then carry no upload): {SUMMED: the modular sum, SHARES: how many}."""

    upload: dict[str, torch.Tensor]


SECURE_SUM = "secure sum"  # the name a SecureSumRelease is yielded under


@dataclass
class PlanRequest:
    planned_steps: int
    batch_size: int
    total_examples: int


class ClientRunner(Protocol):
    def plan(self, requests: Mapping[str, PlanRequest]) -> Mapping[str, Mapping[str, Any]]: ...

    def run(
        self,
        names: Sequence[str],
        round_index: int,
        sub_round: int,
        steps: Mapping[str, int],
        global_state: Mapping[str, torch.Tensor],
        progress: bool,
        secure_mean: SecureMeanEncoding | None = None,
    ) -> Iterator[tuple[str, ClientRelease | ClientFailure | SecureSumRelease]]: ...


class Federation:
    """Rounds, participants, the min-clients rule, aggregation and the privacy account of one federated run."""

    def __init__(
        self,
        method: FederatedMethod,
        args: Any,
        clients: Mapping[str, ClientFacts],
        global_state: dict[str, torch.Tensor],
        runner: ClientRunner,
        *,
        client_level: ClientLevelPrivacy | None = None,
        accounts: ScheduledAccounts | None = None,
    ):
        if args.clients_per_round is not None and args.clients_per_round > len(clients):
            raise ValueError(f"clients_per_round={args.clients_per_round} exceeds the {len(clients)} clients")
        self.method = method
        self.args = args
        self.clients = dict(clients)
        self.global_state = global_state  # updated in place: the trainer and the Federation share it
        self.runner = runner
        self.client_level = client_level if client_level is not None and client_level.enabled else None
        self.accounts = accounts
        self.rounds_done = 0
        self.schedule: dict[int, list[str]] = {}  # example unit / non-private: drawn from the published seed
        self.failed: dict[int, list[str]] = {}
        self.round_history: list[dict[str, Any]] = []
        self._participation_rng = np.random.default_rng(args.seed)
        self.secure_sum = SIMULATED_SECURE_SUM  # how a secure sum runs: the transport says (Flower: SecAgg)

    @property
    def secret_participation(self) -> bool:
        """Under client-level DP who takes part (and how many) is never published."""
        return self.client_level is not None

    @property
    def private(self) -> bool:
        return self.client_level is not None or self.accounts is not None

    # --- planning -------------------------------------------------------------------------------
    def plan(self, num_rounds: int) -> None:
        """Plan rounds rounds_done..num_rounds-1: participants (example unit: from the published seed) and each
        client's steps, then the privacy plan; a plan that does not fit is refused before any step runs."""
        rounds = range(self.rounds_done, num_rounds)
        names = list(self.clients)
        state = self._participation_rng.bit_generator.state  # restored if the plan is refused
        try:
            if self.client_level is not None:
                releases = max((self.method.num_sub_rounds(r) for r in rounds), default=1)
                distributed = self.client_level.noise_placement == "distributed"
                if distributed and self.method.regulates_noise():
                    raise ValueError(
                        f"{self.method.name} shapes the aggregator's noise by the global adapter; with "
                        "dp_noise_placement='distributed' each client adds isotropic noise. Use "
                        "dp_noise_placement='central'."
                    )
                self.client_level.plan(
                    len(names),
                    self.args.clients_per_round,
                    len(rounds),
                    releases,
                    upload_size=self._largest_release(rounds) if distributed else 0,
                    min_clients=self.args.min_clients_per_round,
                )
                return
            schedule = {r: self.schedule.get(r) or self._draw_participants(names) for r in rounds}
            if self.accounts is not None:
                self._plan_example_level(schedule, rounds)
            self.schedule.update(schedule)
        except Exception:
            self._participation_rng.bit_generator.state = state
            raise

    def _largest_release(self, rounds: range) -> int:
        """How many numbers the largest (sub-)round release holds: the distributed encoding's size."""
        sizes = [
            sum(
                tensor.numel()
                for tensor in parameters_of(self.global_state, self.method.uploaded_factors(r, s)).values()
            )
            for r in list(rounds)[:2]
            for s in range(self.method.num_sub_rounds(r))
        ]
        return max(sizes, default=0)

    def _draw_participants(self, names: list[str]) -> list[str]:
        count = self.args.clients_per_round or len(names)
        chosen = self._participation_rng.choice(len(names), size=count, replace=False)
        return [names[i] for i in sorted(chosen)]

    def _plan_example_level(self, schedule: Mapping[int, list[str]], rounds: range) -> None:
        planned = {
            name: sum(facts.local_steps * self.method.num_sub_rounds(r) for r in rounds if name in schedule[r])
            for name, facts in self.clients.items()
        }
        total = sum(facts.num_examples for facts in self.clients.values())
        batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        requests = {name: PlanRequest(planned[name], batch, total) for name in self.clients}
        replies = self.runner.plan(requests)
        for name, facts in self.clients.items():
            self.accounts.accept_plan(name, facts.num_examples, batch, planned[name], replies[name])

    # --- one round ------------------------------------------------------------------------------
    def run_round(self, round_index: int) -> dict[str, Any]:
        """Every sub-round of one round; returns the round's entry for the history (without epsilon: the caller
        adds it at its logging cadence). The global state is updated in place."""
        if self.client_level is not None:
            if not self.client_level.can_run_round():
                raise RuntimeError("the client-level privacy budget of this run is spent: no round may run")
            participants = self.client_level.sample_participants(list(self.clients))
            self.client_level.record_round()  # accounted before any noise of the round is drawn
        else:
            participants = self.schedule[round_index]
        failed: list[str] = []
        losses: list[float] = []
        for sub_round in range(self.method.num_sub_rounds(round_index)):
            active = [name for name in participants if name not in failed]
            newly_failed = self._sub_round(round_index, sub_round, active, participants, losses)
            failed += newly_failed
        if failed and not self.secret_participation:
            self.failed.setdefault(round_index + 1, []).extend(failed)
        self.rounds_done = round_index + 1
        entry: dict[str, Any] = {"round": round_index + 1}
        if not self.secret_participation:
            entry["clients"] = len(participants) - len(failed)
        if losses:
            entry["train_loss"] = float(np.mean(losses))
        self.round_history.append(entry)
        return entry

    def _sub_round(
        self, round_index: int, sub_round: int, active: list[str], participants: list[str], losses: list[float]
    ) -> list[str]:
        keys = list(parameters_of(self.global_state, self.method.uploaded_factors(round_index, sub_round)))
        steps = {name: self.clients[name].local_steps for name in active}
        if self.accounts is not None:
            for name in active:  # counted when sent: a client that fails half-way has spent them
                self.accounts.schedule(name, steps[name])
        secure_mean = None
        if self.client_level is not None:
            aggregate = self.client_level.aggregator(keys, round_index, sub_round, self.args.seed)
            streaming, uploads, weights = None, None, None
        elif self.args.secure_aggregation:
            secure_mean = SecureMeanEncoding.plan(
                self.global_state,
                keys,
                {name: self._weight(name) for name in active},
                bits=self.args.secure_sum_bits,
                clip_range=self.args.secure_aggregation_range,
                public_seed=self.args.seed,
                round_index=round_index,
                sub_round=sub_round,
            )
            aggregate = SecureMeanSum(secure_mean)
            streaming, uploads, weights = None, None, None
        else:
            aggregate = None
            streaming = self.method.streaming_aggregator()
            uploads, weights = [], []
        failed: dict[str, str] = {}
        progress = not self.secret_participation and not self.args.disable_tqdm
        releases = self.runner.run(
            active, round_index, sub_round, steps, self.global_state, progress, secure_mean=secure_mean
        )
        for name, release in releases:
            if isinstance(release, SecureSumRelease):
                aggregate.add(release.upload)
                continue
            if isinstance(release, ClientFailure):
                failed[name] = release.reason
                if self.accounts is not None:
                    self.accounts.failed(name, steps[name])
                self._report_failure(round_index, name, release.reason)
                continue
            if self.accounts is not None:
                self.accounts.check(name, release.privacy or {})
            losses.extend(release.losses)
            if release.upload is None:
                continue
            if aggregate is not None:
                aggregate.add(release.upload)
            elif streaming is not None:
                streaming.add(release.upload, self._weight(name))
            else:
                uploads.append(release.upload)
                weights.append(self._weight(name))
        self._check_enough_clients(round_index, participants, active, failed)
        if isinstance(aggregate, SecureMeanSum) and not aggregate.count:
            return list(failed)  # nobody's upload arrived: nothing to average
        if aggregate is not None:
            self.global_state.update(aggregate.release(self.global_state, self.method.regulates_noise()))
        elif streaming is not None and streaming.count:
            self.global_state.update(streaming.result())
        elif uploads:
            self.global_state.update(self.method.aggregate(uploads, weights))
        else:
            return list(failed)  # nothing was aggregated: the global state, and so the method's server step, stay
        self.global_state.update(self.method.after_aggregation(self.global_state))
        return list(failed)

    def _weight(self, name: str) -> float:
        if self.args.aggregation_weights == "uniform":
            return 1.0
        return float(self.clients[name].num_examples)

    def _report_failure(self, round_index: int, name: str, reason: str) -> None:
        if self.args.min_clients_per_round is None:
            raise RuntimeError(
                f"Round {round_index + 1}: a client failed and min_clients_per_round is not set, so the run stops. "
                + ("" if self.secret_participation else f"Client {name!r}: {reason}")
            )
        if not self.secret_participation:  # under client-level DP even a failure says who took part
            logger.warning(f"Round {round_index + 1}: client {name!r} failed and is left out ({reason})")

    def _check_enough_clients(
        self, round_index: int, participants: list[str], active: list[str], failed: Mapping[str, str]
    ) -> None:
        """One rule for every transport: at least min(min_clients_per_round, participants) must finish every
        sub-round (a client that failed an earlier sub-round of the round is not active in the later ones)."""
        if not failed:
            return
        finished = len(active) - len(failed)
        required = min(self.args.min_clients_per_round, len(participants))
        if finished < required:
            detail = "" if self.secret_participation else f" (failed: {dict(failed)})"
            raise RuntimeError(
                f"Round {round_index + 1}: fewer than min_clients_per_round={self.args.min_clients_per_round} clients "
                f"finished{detail}. The global adapter is the one after round {round_index}; the failed clients' spent "
                "privacy is counted."
            )

    # --- the account ----------------------------------------------------------------------------
    def privacy_report(self) -> dict[str, Any]:
        if self.client_level is not None:
            return self.client_level.report()
        if self.accounts is not None:
            return self.accounts.report()
        return {"private": False, "unit": None, "epsilon": None, "clients": {}}

    def max_epsilon(self) -> float:
        report = self.privacy_report()
        return float(report["epsilon"]) if report.get("epsilon") is not None else math.nan

    def record(self, label_histograms: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, Any]:
        """The federation's part of the record: what ran, and what may be published about who ran it. Label
        histograms are computed without noise: under DP published only on request, listed as not covered."""
        args = self.args
        publish = not self.private or bool(args.publish_unprotected_statistics)
        record: dict[str, Any] = {
            "rounds": self.rounds_done,
            "num_clients": len(self.clients),
            "clients_per_round": args.clients_per_round or len(self.clients),
            "local_steps": args.local_steps,
            "local_epochs": args.local_epochs,
            "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "physical_batch_size": args.per_device_train_batch_size,
            "learning_rate": args.learning_rate,
            "aggregation_weights": "uniform (DP-FedAvg)" if self.secret_participation else args.aggregation_weights,
        }
        if not self.secret_participation:
            record.update(
                client_sizes={name: facts.num_examples for name, facts in self.clients.items()},
                steps_per_round={name: facts.local_steps for name, facts in self.clients.items()},
                sub_rounds_per_round=[self.method.num_sub_rounds(r) for r in range(self.rounds_done)],
                schedule={str(r + 1): names for r, names in sorted(self.schedule.items()) if r < self.rounds_done},
                failed_clients={str(r): names for r, names in self.failed.items()},
            )
        if publish or not self.secret_participation:  # under client-level DP not even the key
            record["client_label_histograms"] = dict(label_histograms or {}) if publish else {}
        if args.secure_aggregation:
            record["secure_aggregation"] = {
                "sum": self.secure_sum,
                "clip_range": args.secure_aggregation_range,
                "bits": args.secure_sum_bits,
            }
        record.update(
            unprotected_statistics_published=self.private and publish,
            hyperparameter_selection=args.hyperparameter_selection,
            privacy=self.privacy_report(),
            round_history=self.round_history,
        )
        return record

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Public state (a checkpoint may hold it); the secret part is `secret_state_dict`."""
        return {
            "rounds_done": self.rounds_done,
            "schedule": {str(r): names for r, names in self.schedule.items()},
            "failed": {str(r): names for r, names in self.failed.items()},
            "round_history": self.round_history,
            "participation_rng": self._participation_rng.bit_generator.state,
            "accounts": self.accounts.state_dict() if self.accounts is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rounds_done = int(state["rounds_done"])
        self.schedule = {int(r): names for r, names in state["schedule"].items()}
        self.failed = {int(r): names for r, names in state["failed"].items()}
        self.round_history = list(state["round_history"])
        self._participation_rng.bit_generator.state = state["participation_rng"]
        if self.accounts is not None and state.get("accounts") is not None:
            self.accounts.load_state_dict(state["accounts"])

    def secret_state_dict(self) -> dict[str, Any] | None:
        """The aggregator's secret streams (client-level DP): for the secret store only."""
        return self.client_level.state_dict() if self.client_level is not None else None

    def load_secret_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.client_level is not None and state is not None:
            self.client_level.load_state_dict(state)
