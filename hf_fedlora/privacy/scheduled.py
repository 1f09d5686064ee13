"""The server's own account of what each client spends under the example unit, from what it planned and scheduled.

The epsilon the record publishes is derived here, never copied from a client's report: each client's noise
multiplier (from its plan, checked to meet the target for the planned steps), its sample rate (the logical batch over
its size, as the server computes it), what its examples spent before this run (the prior candidates its plan
reports), and the steps the server itself scheduled, counted when sent. A client report that disagrees with this
account (fewer steps, another rate or noise) is refused: the run stops before that release is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .accountants import epsilon_from_history
from .state import History, merged_history, steps_of


@dataclass
class ScheduledClient:
    num_examples: int
    sample_rate: float
    noise_multiplier: float
    prior_candidates: list[History]
    spent_before_plan: History  # this run's steps the client had run before its latest plan (resumed runs)
    scheduled: int = 0  # steps sent since the latest plan
    unconfirmed: int = 0  # steps sent in rounds the client failed: counted, though it may not have run them all

    def own_history(self) -> History:
        return merged_history(self.spent_before_plan + [(self.noise_multiplier, self.sample_rate, self.scheduled)])

    def candidates(self) -> list[History]:
        own = self.own_history()
        return [merged_history(prior + own) for prior in (self.prior_candidates or [[]])]


@dataclass
class ScheduledAccounts:
    """Per client: (sigma, q, prior, scheduled steps); its report has the shape of `FederatedPrivacy.report()`."""

    delta: float
    accountant: str
    target_epsilon: float | None
    fixed_noise_multiplier: float | None
    clients: dict[str, ScheduledClient] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)

    def accept_plan(self, name: str, num_examples: int, batch_size: int, planned_steps: int, plan: Mapping) -> None:
        """Take a client's plan (`plan_reply`) after checking it: its rate is batch / n, its noise the fixed one or
        enough for every prior candidate plus the planned steps to stay within the target."""
        rate = batch_size / num_examples
        sigma = float(plan["noise_multiplier"])
        if not math.isclose(float(plan["sample_rate"]), rate, rel_tol=1e-9):
            raise ValueError(f"client {name!r} planned sample rate {plan['sample_rate']}, the server's is {rate}")
        if self.fixed_noise_multiplier is not None and sigma != float(self.fixed_noise_multiplier):
            raise ValueError(f"client {name!r} planned noise {sigma}, the run's is {self.fixed_noise_multiplier}")
        candidates = [merged_history(c) for c in plan.get("prior_candidates") or []]
        spent = merged_history(plan.get("own_history") or [])
        previous = self.clients.get(name)
        if previous is not None and steps_of(spent) < steps_of(previous.own_history()):
            raise ValueError(
                f"client {name!r} re-planned with {steps_of(spent)} steps spent in this run, but the server scheduled "
                f"{steps_of(previous.own_history())}: its plan is refused"
            )
        client = ScheduledClient(num_examples, rate, sigma, candidates, spent)
        if self.target_epsilon is not None and planned_steps:
            planned = (sigma, rate, planned_steps)
            projected = max(self._epsilon(merged_history(h + [planned])) for h in client.candidates())
            if projected > self.target_epsilon:
                raise ValueError(
                    f"client {name!r} planned noise {sigma:.4g} at rate {rate:.4g}: its {planned_steps} planned steps "
                    f"would reach epsilon {projected:.3f} > dp_target_epsilon={self.target_epsilon}"
                )
        self.clients[name] = client
        if plan.get("seeded"):  # its streams came from a secret seed at some point: the card must say so
            self.header["seeded"] = True

    def schedule(self, name: str, steps: int) -> None:
        """Count steps as spent when they are sent to the client (a client that fails half-way has spent them)."""
        self.clients[name].scheduled += int(steps)

    def failed(self, name: str, steps: int) -> None:
        """A client failed in a (sub-)round it was sent `steps` steps for: it may have run fewer. The account keeps
        them all (an over-count, never an under-count); its later reports may show up to that many fewer."""
        self.clients[name].unconfirmed += int(steps)

    def check(self, name: str, client_report: Mapping[str, Any]) -> None:
        """Refuse a client's report whose spend disagrees with what the server scheduled."""
        expected = self.history(name)
        reported = merged_history(client_report.get("history") or [])
        if client_report.get("seeded"):
            self.header["seeded"] = True
        slack = self.clients[name].unconfirmed
        if reported != expected and not _within(reported, expected, slack):
            raise ValueError(
                f"client {name!r} reports the history {reported}, but the server planned and scheduled {expected}: "
                "its report is refused (a client must account every step it is sent)"
            )

    def _epsilon(self, history: History) -> float:
        return epsilon_from_history(history, self.delta, self.accountant)

    def epsilon(self, name: str) -> float:
        return max(self._epsilon(h) for h in self.clients[name].candidates())

    def history(self, name: str) -> History:
        return max(self.clients[name].candidates(), key=self._epsilon)

    def report(self) -> dict[str, Any]:
        clients = {
            name: {
                "epsilon": self.epsilon(name),
                "num_examples": c.num_examples,
                "noise_multiplier": c.noise_multiplier,
                "sample_rate": c.sample_rate,
                "steps": steps_of(self.history(name)),
                "history": [list(entry) for entry in self.history(name)],
            }
            for name, c in self.clients.items()
        }
        return {
            **self.header,
            "epsilon": max((c["epsilon"] for c in clients.values()), default=0.0),
            "clients": clients,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {
                "num_examples": c.num_examples,
                "sample_rate": c.sample_rate,
                "noise_multiplier": c.noise_multiplier,
                "prior_candidates": c.prior_candidates,
                "spent_before_plan": c.spent_before_plan,
                "scheduled": c.scheduled,
                "unconfirmed": c.unconfirmed,
            }
            for name, c in self.clients.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.clients = {
            name: ScheduledClient(
                int(s["num_examples"]),
                float(s["sample_rate"]),
                float(s["noise_multiplier"]),
                [merged_history(c) for c in s["prior_candidates"]],
                merged_history(s["spent_before_plan"]),
                int(s["scheduled"]),
                int(s.get("unconfirmed", 0)),
            )
            for name, s in state.items()
        }


def _within(reported: History, expected: History, slack: int) -> bool:
    """The same history but for the last entry, which may be short by up to `slack` steps (failed rounds)."""
    if not slack or len(reported) != len(expected) or reported[:-1] != expected[:-1]:
        return False
    (sigma, rate, steps), (expected_sigma, expected_rate, expected_steps) = reported[-1], expected[-1]
    return (sigma, rate) == (expected_sigma, expected_rate) and expected_steps - slack <= steps <= expected_steps
