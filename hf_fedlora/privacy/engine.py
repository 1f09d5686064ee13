"""Per-client example-level DP-SGD: the one place that decides noise, enforces budgets and reports epsilon.

Each client runs DP-SGD on its own shard: Poisson sampling at rate q_k, per-example clipping of all its trainable
tensors together to `clip_norm`, Gaussian noise `noise_multiplier * clip_norm`, and its own accountant kept for the
whole run. Clients' data are disjoint, so the run's guarantee is the largest epsilon over clients. No amplification
from client sampling is claimed.

Both random streams the guarantee rests on, the Poisson sampler (amplification by subsampling assumes batch
membership is secret) and the noise, come from OS entropy, never from the run's published seed. A secret seed makes
them reproducible for experiments; the report then says the guarantee holds only while that seed stays secret.
Secure mode draws every batch and every noise tensor from a fresh generator seeded by OS entropy, with the noise
robust to floating-point attacks (no generator state exists that could regenerate it).

Composition across runs is per example: a client whose examples were held by earlier clients starts from each of
their spent histories ("prior candidates"); its epsilon is the largest over them of the candidate composed with its
own steps, and its recorded history is that worst composition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from ..federation.adapter_state import factor_of
from .accountants import epsilon_from_history, make_accountant
from .calibration import calibrate_grid, calibrate_noise_multiplier, grid_point
from .dp_optimizer import ShapedNoiseDPOptimizer
from .mechanism import DPMechanism, derived_seed, mechanism_arguments
from .noise import draw_noise
from .opacus_compat import IAccountant
from .postprocessing import NOISY_GRADIENT_FILTERS
from .state import History, decode_generator_state, encode_generator_state, merged_history, steps_of

UNIT = "example"  # the default unit of privacy
UNITS = ("example", "client")
GRID_CALIBRATION = "per_client_grid"
CALIBRATIONS = ("per_client", "shared", GRID_CALIBRATION)
DEFAULT_GRID_RATIO = 1.25
SAMPLING_STREAM, NOISE_STREAM = 0, 1

logger = logging.get_logger(__name__)


@dataclass
class ClientPrivacy:
    """One client's DP state: its noise, its step budget, its accountant, its secret RNGs, and what its examples
    spent before this run (one history per earlier client that held some of them)."""

    num_examples: int
    sample_rate: float
    noise_multiplier: float
    step_budget: int | None  # None when no target epsilon was given (noise multiplier set directly)
    accountant: IAccountant  # this run's steps
    noise_generator: torch.Generator
    sampling_generator: torch.Generator
    prior_candidates: list[History] = field(default_factory=list)

    @property
    def own_history(self) -> History:
        return merged_history(self.accountant.history)

    @property
    def history(self) -> History:
        """Its total history, when its examples have at most one earlier history (else ask the engine for the worst:
        `FederatedPrivacy.history(name)`)."""
        candidates = self.candidates()
        if len(candidates) > 1:
            raise ValueError("this client has several prior candidates: FederatedPrivacy.history gives the worst")
        return candidates[0]

    @property
    def steps_taken(self) -> int:
        """Steps run in this run (what the step budget counts)."""
        return steps_of(self.accountant.history)

    def candidates(self) -> list[History]:
        """Each possible total history of one of its examples: a prior candidate (or nothing) + this run's steps."""
        own = self.own_history
        return [merged_history(prior + own) for prior in (self.prior_candidates or [[]])]


class FederatedPrivacy(DPMechanism):
    """Calibrates each client's noise before training, guards its budget and answers for its epsilon."""

    unit = UNIT

    def __init__(
        self,
        *,
        target_epsilon: float | None,
        target_delta: float,
        noise_multiplier: float | None,
        clip_norm: float,
        clipping: str = "flat",
        accountant: str = "prv",
        calibration: str = "per_client",
        secret_seed: int | None = None,
        grid_ratio: float = DEFAULT_GRID_RATIO,
        secure_mode: bool = False,
    ):
        super().__init__(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            noise_multiplier=noise_multiplier,
            clip_norm=clip_norm,
            clipping=clipping,
            accountant=accountant,
            secret_seed=secret_seed,
            secure_mode=secure_mode,
        )
        self.calibration = calibration
        # per_client_grid: clients share the noise of the geometric grid point (rate, steps) at or above their own.
        self.grid_ratio = grid_ratio
        self._verified_on_grid: set[str] = set()  # planned on a grid point already checked against the target
        self.clients: dict[str, ClientPrivacy] = {}
        self._prior_by_name: dict[str, list[History]] = {}  # candidates by client name (the same partition)
        self._prior_for_every_client: list[History] = []  # composed by worst case (a re-split)
        self._recalibrate: set[str] = set()  # clients that spent more than planned (a crash): new noise on plan
        # name -> (candidate histories, epsilon): a round's log recomputes only the clients whose history changed
        self._epsilon_cache: dict[str, tuple[tuple, float]] = {}

    @classmethod
    def from_args(cls, args: Any) -> FederatedPrivacy:
        """The engine a run's `FederatedTrainingArguments` describe (every driver builds it the same way)."""
        return cls(**mechanism_arguments(args), calibration=args.dp_noise_calibration)

    # --- before training --------------------------------------------------------------
    def plan(
        self,
        client_sizes: Mapping[str, int],
        batch_size: int,
        planned_steps: Mapping[str, int],
        device: torch.device,
        *,
        client_indices: Mapping[str, int] | None = None,
        total_examples: int | None = None,
    ) -> None:
        """Fix each client's sample rate (batch_size / n_k, batch_size the logical, expected Poisson batch) and noise
        so the planned steps fit its budget; refuse plans that don't, before any step runs.

        Called again on a later `train()` of the same run: the accountants keep their history, the noise stays as
        calibrated, and a plan that would take any client past its target is refused with the numbers.

        A driver that plans only some clients here (a Flower client plans itself) passes each one's
        `client_indices` (its position in the federation, which derives its secret streams) and the federation's
        `total_examples` (delta must be far below 1/N for all N examples, not only this object's).
        """
        for name, size in client_sizes.items():
            if batch_size > size:
                raise ValueError(
                    f"The logical batch {batch_size} (per_device_train_batch_size x gradient_accumulation_steps) "
                    f"is larger than client {name!r}'s {size} examples: its Poisson sample rate would exceed 1. "
                    "Use a smaller batch, fewer clients, or a partition with a larger minimum client size."
                )
        self._check_delta(total_examples if total_examples is not None else sum(client_sizes.values()))
        new_clients = [name for name in client_sizes if name not in self.clients]
        rates = {name: batch_size / size for name, size in client_sizes.items()}
        if self.calibration == GRID_CALIBRATION and self.fixed_noise_multiplier is None:
            sigmas = self._grid_noise(new_clients, rates, planned_steps)
        else:
            sigmas = {
                name: self._noise_for(rates[name], planned_steps[name], self._candidates_for(name))
                for name in new_clients
            }
        if self.calibration == "shared" and sigmas:
            shared = max(sigmas.values())
            sigmas = dict.fromkeys(sigmas, shared)
        for position, name in enumerate(client_sizes):
            if name in self.clients:
                continue
            index = client_indices[name] if client_indices is not None else position
            noise_generator = torch.Generator(device=device)
            noise_generator.manual_seed(derived_seed(self._secret_root, index, NOISE_STREAM))
            sampling_generator = torch.Generator().manual_seed(derived_seed(self._secret_root, index, SAMPLING_STREAM))
            self.clients[name] = ClientPrivacy(
                num_examples=client_sizes[name],
                sample_rate=rates[name],
                noise_multiplier=sigmas[name],
                step_budget=None,  # set below, once the whole plan is known to fit
                accountant=make_accountant(self.accountant_name),
                noise_generator=noise_generator,
                sampling_generator=sampling_generator,
                prior_candidates=self._candidates_for(name),
            )
        for name in sorted(self._recalibrate & set(client_sizes)):
            client = self.clients[name]
            spent = [merged_history(c) for c in client.candidates()]
            client.noise_multiplier = self._noise_for(client.sample_rate, planned_steps[name], spent)
            self._recalibrate.discard(name)
        self._refuse_overspending_plan(planned_steps)

    def _grid_noise(
        self, names: list[str], rates: Mapping[str, float], planned_steps: Mapping[str, int]
    ) -> dict[str, float]:
        """Each client gets the noise calibrated for the grid point (rate ratio^-j, steps ceil(ratio^k)) just at or
        above its own (rate, steps): one search per occupied grid point instead of one per client. For a fixed
        noise multiplier epsilon grows with the rate and the steps, so every client still meets the target (a
        client placed below its point spends a little less). Clients composing with an earlier run, or running
        no step, are calibrated on their own."""
        points = {
            name: grid_point(rates[name], planned_steps[name], self.grid_ratio)
            for name in names
            if planned_steps[name] > 0 and not self._candidates_for(name)
        }
        grid = calibrate_grid(self.target_epsilon, self.delta, points.values(), self.accountant_name)
        self._verified_on_grid.update(points)
        return {
            name: grid[points[name]]
            if name in points
            else self._noise_for(rates[name], planned_steps[name], self._candidates_for(name))
            for name in names
        }

    def _check_delta(self, total_examples: int) -> None:
        """delta bounds the chance that the guarantee fails for some example: it must be far below 1/N for the
        federation's N examples, not only below each client's 1/n_k."""
        if self.delta >= 1.0 / total_examples:
            raise ValueError(
                f"dp_target_delta={self.delta} is not below 1/N for the federation's N={total_examples} examples: "
                "a delta that large allows releasing whole records. Use a delta far below 1/N (e.g. 1e-6)."
            )
        if self.delta > 0.1 / total_examples:
            logger.warning(
                f"dp_target_delta={self.delta} is not far below 1/N for the federation's N={total_examples} examples "
                f"(1/N={1.0 / total_examples:.3g}); a delta below {0.1 / total_examples:.3g} is the usual advice."
            )

    def _noise_for(self, sample_rate: float, steps: int, candidates: Sequence[History]) -> float:
        """The smallest noise that keeps every candidate history, composed with the planned steps, within target."""
        if self.fixed_noise_multiplier is not None:
            return float(self.fixed_noise_multiplier)
        if steps == 0:
            return 0.0  # a client never sampled runs no step and releases nothing
        return max(
            calibrate_noise_multiplier(
                self.target_epsilon,
                self.delta,
                sample_rate,
                steps,
                self.accountant_name,
                prior_history=tuple(tuple(entry) for entry in prior),
            )
            for prior in (candidates or [[]])
        )

    def _refuse_overspending_plan(self, planned_steps: Mapping[str, int]) -> None:
        if self.target_epsilon is None:
            return
        problems = []
        for name, steps in planned_steps.items():
            client = self.clients[name]
            if steps == 0:
                continue
            if name in self._verified_on_grid and not client.steps_taken and not client.prior_candidates:
                # Its grid point (rate and steps at or above its own, same sigma) was checked in calibration.
                continue
            planned = (client.noise_multiplier, client.sample_rate, steps)
            epsilon = max(
                epsilon_from_history(history + [planned], self.delta, self.accountant_name)
                for history in client.candidates()
            )
            if epsilon > self.target_epsilon:
                problems.append(
                    f"client {name!r}: {client.steps_taken} steps already run + {steps} planned at noise "
                    f"multiplier {client.noise_multiplier:.4g}, sample rate {client.sample_rate:.4g} -> epsilon "
                    f"{epsilon:.3f}"
                )
        if problems:
            raise ValueError(
                f"This plan would exceed dp_target_epsilon={self.target_epsilon} (delta={self.delta}, "
                f"{self.accountant_name} accountant); nothing was trained. " + "; ".join(problems)
            )
        for name, steps in planned_steps.items():
            self.clients[name].step_budget = self.clients[name].steps_taken + steps

    # --- composing with earlier runs ---------------------------------------------------
    def compose_with(self, prior_privacy: Mapping[str, Any], *, by_name: bool) -> None:
        """Start every client from what its examples already spent in an earlier run (that run's record's privacy).

        `by_name`: the clients are the earlier run's (the same names, the same content-keyed partition of one
        dataset), so client k's examples that were trained on before were in the earlier client k. Otherwise every
        client may hold examples of any earlier client: each inherits every earlier client's history as a
        candidate, and answers for the worst.
        """
        unit = prior_privacy.get("unit")
        if unit != self.unit:
            raise ValueError(
                f"The adapter was trained under privacy unit {unit!r}; this run's unit is {self.unit!r}: they cannot "
                "be composed. Set dp_new_privacy_budget=True only if this run's data are disjoint from that run's."
            )
        priors = {
            name: merged_history(client["history"]) for name, client in (prior_privacy.get("clients") or {}).items()
        }
        if not by_name:
            self._prior_for_every_client = _distinct(priors.values())
            return
        self._prior_by_name.update({name: [history] for name, history in priors.items()})

    def set_prior_candidates(self, name: str, candidates: Sequence[History]) -> None:
        """What the examples of a client not yet planned spent before (a driver that keeps per-example ledgers)."""
        if name in self.clients:
            raise ValueError(f"client {name!r} is planned already: its prior spend must be known before its plan")
        self._prior_by_name[name] = _distinct(merged_history(c) for c in candidates)

    def _candidates_for(self, name: str) -> list[History]:
        if name in self._prior_by_name:
            return list(self._prior_by_name[name])
        return list(self._prior_for_every_client)

    # --- during training --------------------------------------------------------------
    def can_step(self, name: str) -> bool:
        """False once a client has run every step its budget allows: it then stops for good."""
        client = self.clients[name]
        return client.step_budget is None or client.steps_taken < client.step_budget

    def private_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        batch_size: int,
        adapter: Mapping[str, torch.nn.Parameter],
        *,
        regulate: bool = False,
        noisy_gradient_filter: str | None = None,
        loss_scale: float = 1.0,
    ) -> ShapedNoiseDPOptimizer:
        """DP-SGD for one client-round: clip each example's gradient, sum, add noise (shaped by the frozen peer
        under DEeR's regulator), filter the noisy sum if the method asks (post-processing), divide by the
        expected batch size. `loss_scale`: the fixed factor the loss was multiplied by (fp16), divided out of
        each example's gradient before its norm."""
        client = self.clients[name]
        names = {id(parameter): key for key, parameter in adapter.items()}
        filter_fn = NOISY_GRADIENT_FILTERS[noisy_gradient_filter] if noisy_gradient_filter else None

        def noise_for(parameter: torch.nn.Parameter, std: float, generator: torch.Generator | None) -> torch.Tensor:
            key = names[id(parameter)]
            generator = self._generator(generator, parameter.device)
            return self.noise(key, parameter.shape, adapter, std, generator, regulate, self.secure_mode).to(
                parameter.dtype
            )

        def after_noise(parameter: torch.nn.Parameter, noisy: torch.Tensor) -> torch.Tensor:
            if filter_fn is None:
                return noisy
            return filter_fn(noisy, factor_of(names[id(parameter)]))

        return ShapedNoiseDPOptimizer(
            optimizer,
            noise_for=noise_for,
            after_noise=after_noise,
            noise_multiplier=client.noise_multiplier,
            max_grad_norm=self.clip_norm,
            clipping=self.clipping,
            loss_scale=loss_scale,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=client.noise_generator,
        )

    # The noise of every release (a staticmethod so a test can wrap it).
    noise = staticmethod(draw_noise)

    def sample_batch(self, name: str) -> list[int]:
        """Poisson sampling from the client's secret stream: each example joins independently with rate q."""
        client = self.clients[name]
        generator = self._generator(client.sampling_generator)
        mask = torch.rand(client.num_examples, generator=generator) < client.sample_rate
        return mask.nonzero().flatten().tolist()

    def record_step(self, name: str) -> None:
        client = self.clients[name]
        client.accountant.step(noise_multiplier=client.noise_multiplier, sample_rate=client.sample_rate)

    # --- reporting ----------------------------------------------------------------------
    def epsilon(self, name: str, client: ClientPrivacy | None = None) -> float:
        """The client's epsilon: the worst of its candidate histories; recomputed only when they changed since the
        last call (with 1,000 clients and 10 per round, a round's log recomputes 10)."""
        client = client if client is not None else self.clients[name]
        candidates = client.candidates()
        key = tuple(tuple(history) for history in candidates)
        cached = self._epsilon_cache.get(name)
        if cached is None or cached[0] != key:
            worst = max(epsilon_from_history(h, self.delta, self.accountant_name) for h in candidates)
            cached = self._epsilon_cache[name] = (key, worst)
        return cached[1]

    def history(self, name: str, client: ClientPrivacy | None = None) -> History:
        """The client's reported history: its worst candidate composed with its own steps."""
        client = client if client is not None else self.clients[name]
        return max(client.candidates(), key=lambda h: epsilon_from_history(h, self.delta, self.accountant_name))

    def max_epsilon(self) -> float:
        return max((self.epsilon(name, c) for name, c in self.clients.items()), default=0.0)

    def client_report(self, name: str, client: ClientPrivacy | None = None) -> dict[str, Any]:
        client = client if client is not None else self.clients[name]
        history = self.history(name, client)
        return {
            "epsilon": self.epsilon(name, client),
            "num_examples": client.num_examples,
            "noise_multiplier": client.noise_multiplier,
            "sample_rate": client.sample_rate,
            "steps": steps_of(history),
            "history": [list(entry) for entry in history],
        }

    def plan_reply(self, name: str) -> dict[str, Any]:
        """What a client's plan tells the server, which keeps its own account (`ScheduledAccounts`)."""
        client = self.clients[name]
        return {
            "noise_multiplier": client.noise_multiplier,
            "sample_rate": client.sample_rate,
            "num_examples": client.num_examples,
            "prior_candidates": [[list(entry) for entry in prior] for prior in client.prior_candidates],
            "own_history": [list(entry) for entry in client.own_history],
            "seeded": self.seeded,
        }

    def report(self) -> dict[str, Any]:
        """Everything needed to re-derive each client's epsilon with an independent accountant."""
        if not self.enabled:
            return {"private": False, "unit": None, "epsilon": None, "clients": {}}
        clients = {name: self.client_report(name, c) for name, c in self.clients.items()}
        return self.report_header() | {
            "epsilon": max((c["epsilon"] for c in clients.values()), default=0.0),
            "clients": clients,
        }

    def report_header(self) -> dict[str, Any]:
        """The settings every client's report shares."""
        return {
            "private": True,
            "unit": self.unit,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant_name,
            "clip_norm": self.clip_norm,
            "clipping": self.clipping,
            "noise_calibration": self.calibration if self.target_epsilon is not None else "fixed",
            **(
                {"calibration_grid_ratio": self.grid_ratio}
                if self.calibration == GRID_CALIBRATION and self.target_epsilon is not None
                else {}
            ),
            "secure_mode": self.secure_mode,
            # True when the sampling and noise came from a user's secret seed: then the guarantee holds only
            # while that seed stays secret. The seed itself is never recorded.
            "seeded": self.seeded,
        }

    # --- secret state: the secret store, never beside artefacts ----------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: each client's spent history, noise, budget and secret RNG states.

        JSON-safe (RNG states as base64). It holds the secret streams: it goes to the secret store only.
        """
        return {"clients": {name: self.client_state(name) for name in self.clients}}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.clients = {name: self.client_from_state(s, device) for name, s in state["clients"].items()}

    def client_state(self, name: str) -> dict[str, Any]:
        """One client's part of `state_dict` (a driver that keeps each client's ledger on its own disk)."""
        return _client_state(self.clients[name])

    def load_client_state(self, name: str, state: Mapping[str, Any], device: torch.device) -> None:
        self.clients[name] = self.client_from_state(state, device)

    def recalibrate_on_next_plan(self, names: Sequence[str]) -> None:
        """Clients that ran more steps than planned (a crash after a checkpoint): the next plan gives them the noise
        that keeps what is left within the target."""
        self._recalibrate.update(names)

    def client_from_state(self, s: Mapping[str, Any], device: torch.device) -> ClientPrivacy:
        """A client's privacy state from `client_state` (JSON-safe, RNG states in base64)."""
        accountant = make_accountant(self.accountant_name)
        accountant.history = [(float(a), float(b), int(c)) for a, b, c in s["history"]]
        noise_generator = torch.Generator(device=device)
        decode_generator_state(noise_generator, s["noise_generator"])
        sampling_generator = torch.Generator()
        decode_generator_state(sampling_generator, s["sampling_generator"])
        return ClientPrivacy(
            num_examples=int(s["num_examples"]),
            sample_rate=float(s["sample_rate"]),
            noise_multiplier=float(s["noise_multiplier"]),
            step_budget=s["step_budget"],
            accountant=accountant,
            noise_generator=noise_generator,
            sampling_generator=sampling_generator,
            prior_candidates=[merged_history(c) for c in s.get("prior_candidates", [])],
        )


def _client_state(c: ClientPrivacy) -> dict[str, Any]:
    return {
        "num_examples": c.num_examples,
        "sample_rate": c.sample_rate,
        "noise_multiplier": c.noise_multiplier,
        "step_budget": c.step_budget,
        "history": [list(entry) for entry in c.accountant.history],
        "prior_candidates": [[list(entry) for entry in prior] for prior in c.prior_candidates],
        "noise_generator": encode_generator_state(c.noise_generator),
        "sampling_generator": encode_generator_state(c.sampling_generator),
    }


def _distinct(histories) -> list[History]:
    """Histories without repeats (several earlier clients often spent alike), in first-seen order."""
    seen, distinct = set(), []
    for history in histories:
        key = tuple(tuple(entry) for entry in history)
        if key not in seen:
            seen.add(key)
            distinct.append(list(history))
    return distinct
