"""Per-client sample-level DP-SGD: the one place that decides noise, enforces budgets and reports epsilon.

Each client runs DP-SGD on its own shard: Poisson sampling at rate q_k, per-example
clipping of all its trainable tensors together to `clip_norm`, Gaussian noise
`noise_multiplier * clip_norm`, and its own accountant kept for the whole run. Clients'
data are disjoint, so the run's guarantee is the largest epsilon over clients. No
amplification from client sampling is claimed.

Both random streams the guarantee rests on, the Poisson sampler (amplification by
subsampling assumes batch membership is secret) and the noise, come from OS entropy,
never from the run's published seed. A secret seed makes them reproducible for experiments;
the report then says the guarantee holds only while that seed stays secret.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.accountants import IAccountant
from transformers.utils import logging

from ..federation.adapter_state import LORA_A, LORA_B, factor_of, peer_name
from .accountants import epsilon_from_history, make_accountant
from .calibration import calibrate_grid, calibrate_noise_multiplier, grid_point
from .dp_optimizer import CLIPPINGS, ShapedNoiseDPOptimizer
from .noise_regulator import regulated_noise
from .postprocessing import NOISY_GRADIENT_FILTERS

UNIT = "example"  # the default unit of privacy
UNITS = ("example", "client")
GRID_CALIBRATION = "per_client_grid"
DEFAULT_GRID_RATIO = 1.25
SAMPLING_STREAM, NOISE_STREAM, PARTICIPATION_STREAM = 0, 1, 2

logger = logging.get_logger(__name__)


def derived_seed(seed: int, client_index: int, stream: int) -> int:
    """Independent per-client seeds for independent streams (batch sampling vs. DP noise) from one secret root."""
    return int(np.random.SeedSequence([seed, client_index, stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class ClientPrivacy:
    """One client's DP state: its noise, its step budget, its accountant and its secret RNGs."""

    num_examples: int
    sample_rate: float
    noise_multiplier: float
    step_budget: int | None  # None when no target epsilon was given (noise multiplier set directly)
    accountant: IAccountant
    noise_generator: torch.Generator
    sampling_generator: torch.Generator
    # Client unit: releases per accounted round (DEeR sends twice a round). Each release gets noise
    # noise_multiplier * sqrt(releases) * C, so a round's releases together are one Gaussian mechanism
    # with the accounted noise_multiplier.
    releases_per_step: int = 1

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(entry) for entry in self.accountant.history]

    @property
    def steps_taken(self) -> int:
        return sum(int(steps) for _, _, steps in self.accountant.history)


class FederatedPrivacy:
    """Calibrates each client's noise before training, guards its budget and answers for its epsilon."""

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
        unit: str = UNIT,
        grid_ratio: float = DEFAULT_GRID_RATIO,
    ):
        if unit not in UNITS:
            raise ValueError(f"dp_unit must be one of {list(UNITS)}, got {unit!r}")
        self.unit = unit
        self.target_epsilon = target_epsilon
        self.delta = target_delta
        self.fixed_noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        if clipping not in CLIPPINGS:
            raise ValueError(f"dp_clipping must be one of {list(CLIPPINGS)}, got {clipping!r}")
        self.clipping = clipping
        self.accountant_name = accountant
        self.calibration = calibration
        # per_client_grid: clients share the noise of the geometric grid point (rate, steps) at or above their own.
        self.grid_ratio = grid_ratio
        self._verified_on_grid: set[str] = set()  # planned on a grid point already checked against the target
        self._epsilon_cache: dict[str, tuple[tuple, float]] = {}  # name -> (history, epsilon): recompute on change
        # Anyone who knows this root can rebuild every batch and subtract the noise: by default it is fresh OS
        # entropy, never the run's published seed. A fixed secret seed is for reproducible experiments only.
        self.seeded = secret_seed is not None
        self._secret_root = secret_seed if secret_seed is not None else secrets.randbits(63)
        self.clients: dict[str, ClientPrivacy] = {}
        self._prior_histories: dict[str, list[tuple[float, float, int]]] = {}
        # Clients of an earlier, composed run: until this run plans them (same name), they only report.
        self._past_clients: dict[str, ClientPrivacy] = {}
        self._participation_generator = torch.Generator().manual_seed(
            derived_seed(self._secret_root, 0, PARTICIPATION_STREAM)
        )
        self.client_rate = 1.0  # client unit: the Poisson rate at which clients take part in a round
        self._recalibrate: set[str] = set()  # clients that spent more than planned (a crash): new noise on plan

    @classmethod
    def from_args(cls, args: Any) -> FederatedPrivacy:
        """The engine a run's `FederatedTrainingArguments` describe (every driver builds it the same way)."""
        return cls(
            target_epsilon=args.dp_target_epsilon,
            target_delta=args.dp_target_delta,
            noise_multiplier=args.dp_noise_multiplier,
            clip_norm=args.dp_clip_norm,
            clipping=args.dp_clipping,
            accountant=args.dp_accountant,
            calibration=args.dp_noise_calibration,
            secret_seed=args.dp_secret_seed,
            unit=args.dp_unit,
        )

    @property
    def enabled(self) -> bool:
        return self.target_epsilon is not None or self.fixed_noise_multiplier is not None

    # --- before training --------------------------------------------------------------
    def plan(
        self,
        client_sizes: Mapping[str, int],
        batch_size: int,
        planned_steps: Mapping[str, int],
        device: torch.device,
        *,
        client_rate: float = 1.0,
        releases_per_round: int = 1,
        client_indices: Mapping[str, int] | None = None,
        total_examples: int | None = None,
    ) -> None:
        """Fix each client's sample rate and noise so the planned steps fit its budget; refuse plans that don't.

        Example unit: a step is one DP-SGD step at sample rate batch_size / n_k, batch_size the logical (expected
        Poisson) batch however many micro-batches it runs in. Client unit: a step is one
        round, at the client-sampling rate `client_rate`, in which a client releases `releases_per_round`
        clipped and noised updates.

        Called again on a later `train()` of the same run: the accountants keep their history,
        the noise stays as calibrated, and a plan that would take any client past its target is
        refused with the numbers, before any step runs.

        A driver that plans only some clients here (a Flower client plans itself) passes each one's
        `client_indices` (its position in the federation, which derives its secret streams) and the federation's
        `total_examples` (delta must be far below 1/N for all N examples, not only this object's).
        """
        if self.unit == "client":
            self.client_rate = client_rate
        for name, size in client_sizes.items():
            if self.unit == "example" and batch_size > size:
                raise ValueError(
                    f"The logical batch {batch_size} (per_device_train_batch_size x gradient_accumulation_steps) "
                    f"is larger than client {name!r}'s {size} examples: its Poisson sample rate would exceed 1. "
                    "Use a smaller batch or fewer clients."
                )
        self._check_delta(total_examples if total_examples is not None else sum(client_sizes.values()))
        new_clients = [name for name in client_sizes if name not in self.clients]
        rates = {name: self._sample_rate(size, batch_size) for name, size in client_sizes.items()}
        if self.calibration == GRID_CALIBRATION and self.fixed_noise_multiplier is None:
            sigmas = self._grid_noise(new_clients, rates, planned_steps)
        else:
            sigmas = {
                name: self._noise_for(rates[name], planned_steps[name], self._prior(name)) for name in new_clients
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
            accountant = make_accountant(self.accountant_name)
            accountant.history = list(self._prior(name))
            self._past_clients.pop(name, None)
            self.clients[name] = ClientPrivacy(
                num_examples=client_sizes[name],
                sample_rate=rates[name],
                noise_multiplier=sigmas[name],
                step_budget=None,  # set below, once the whole plan is known to fit
                accountant=accountant,
                noise_generator=noise_generator,
                sampling_generator=sampling_generator,
                releases_per_step=releases_per_round if self.unit == "client" else 1,
            )
        for name in sorted(self._recalibrate & set(client_sizes)):
            client = self.clients[name]
            client.noise_multiplier = self._noise_for(client.sample_rate, planned_steps[name], client.history)
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
            if planned_steps[name] > 0 and not self._prior(name)
        }
        grid = calibrate_grid(self.target_epsilon, self.delta, points.values(), self.accountant_name)
        self._verified_on_grid.update(points)
        return {
            name: grid[points[name]]
            if name in points
            else self._noise_for(rates[name], planned_steps[name], self._prior(name))
            for name in names
        }

    def _sample_rate(self, num_examples: int, batch_size: int) -> float:
        return self.client_rate if self.unit == "client" else batch_size / num_examples

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

    def _noise_for(self, sample_rate: float, steps: int, prior: list[tuple[float, float, int]]) -> float:
        if self.fixed_noise_multiplier is not None:
            return float(self.fixed_noise_multiplier)
        if steps == 0:
            return 0.0  # a client never sampled runs no step and releases nothing
        return calibrate_noise_multiplier(
            self.target_epsilon,
            self.delta,
            sample_rate,
            steps,
            self.accountant_name,
            prior_history=tuple(tuple(entry) for entry in prior),
        )

    # --- composing with an earlier run -----------------------------------------------
    def compose_with(self, prior_privacy: Mapping[str, Any]) -> None:
        """Start every client's accountant from what an earlier run on the same data already spent.

        `prior_privacy` is the "privacy" part of that run's record. Its clients that do not take part in
        this run keep their spent history in the report: the adapter still carries what they released.
        """
        unit = prior_privacy.get("unit")
        if unit != self.unit:
            raise ValueError(
                f"The adapter was trained under privacy unit {unit!r}; this run's unit is {self.unit!r}: they cannot "
                "be composed. Set dp_new_privacy_budget=True only if this run's data are disjoint from that run's."
            )
        for name, client in (prior_privacy.get("clients") or {}).items():
            self._prior_histories[name] = [(float(s), float(q), int(n)) for s, q, n in client["history"]]
            if name not in self.clients:
                accountant = make_accountant(self.accountant_name)
                accountant.history = list(self._prior_histories[name])
                self._past_clients[name] = ClientPrivacy(
                    num_examples=int(client.get("num_examples") or 0),
                    sample_rate=float(client.get("sample_rate") or 0.0),
                    noise_multiplier=float(client.get("noise_multiplier") or 0.0),
                    step_budget=0,
                    accountant=accountant,
                    noise_generator=torch.Generator(),
                    sampling_generator=torch.Generator(),
                )

    def _prior(self, name: str) -> list[tuple[float, float, int]]:
        return self._prior_histories.get(name, [])

    def _refuse_overspending_plan(self, planned_steps: Mapping[str, int]) -> None:
        if self.target_epsilon is None:
            return
        problems = []
        for name, steps in planned_steps.items():
            client = self.clients[name]
            if steps == 0:
                continue
            if name in self._verified_on_grid and not client.history:
                # Its grid point (rate and steps at or above its own, same sigma) was checked in calibration.
                continue
            projected = client.history + [(client.noise_multiplier, client.sample_rate, steps)]
            epsilon = epsilon_from_history(projected, self.delta, self.accountant_name)
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
            return self.noise(key, parameter.shape, adapter, std, generator, regulate).to(parameter.dtype)

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

    @staticmethod
    def noise(
        key: str,
        shape: torch.Size,
        peers: Mapping[str, torch.Tensor],
        std: float,
        generator: torch.Generator | None,
        regulate: bool,
    ) -> torch.Tensor:
        """Gaussian noise for one released tensor: isotropic N(0, std^2), or for a LoRA factor under DEeR's
        regulator shaped by its peer factor (covariance never below std^2 I, so the accounting holds)."""
        factor = factor_of(key)
        peer = peer_name(key)
        if regulate and factor in (LORA_A, LORA_B) and peer in peers:
            return regulated_noise(factor, peers[peer].detach(), shape, std, generator)
        reference = peers[key] if key in peers else None
        device = reference.device if reference is not None else None
        return torch.normal(0.0, std, size=tuple(shape), generator=generator, device=device)

    # --- client unit: the whole round update is the released object ----------------------
    def sample_participants(self, names: list[str]) -> list[str]:
        """Client unit: each client takes part independently with the client rate, drawn from secret randomness
        (amplification by client sampling assumes nobody outside can tell who took part)."""
        if self.client_rate >= 1.0:
            return list(names)
        draws = torch.rand(len(names), generator=self._participation_generator)
        return [name for name, draw in zip(names, draws.tolist(), strict=True) if draw < self.client_rate]

    def release(
        self,
        name: str,
        start: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        peers: Mapping[str, torch.Tensor],
        regulate: bool,
    ) -> dict[str, torch.Tensor]:
        """Client unit: clip the client's whole update (every tensor it sends, together; or per layer, each of
        the P tensors to C / sqrt(P)) to C, add noise, and return what may leave the client. `peers` are public
        values (the global state) that shape the noise."""
        client = self.clients[name]
        update = {key: trained[key].float() - start[key].float() for key in trained}
        if self.clipping == "per_layer":
            threshold = self.clip_norm / math.sqrt(len(update))
            scales = {key: min(1.0, threshold / (float(u.norm()) + 1e-12)) for key, u in update.items()}
        else:
            norm = torch.sqrt(sum((u**2).sum() for u in update.values()))
            scales = dict.fromkeys(update, min(1.0, self.clip_norm / (float(norm) + 1e-12)))
        std = client.noise_multiplier * math.sqrt(client.releases_per_step) * self.clip_norm
        released = {}
        for key, change in update.items():
            noise = self.noise(key, change.shape, peers, std, client.noise_generator, regulate)
            released[key] = (start[key].float() + change * scales[key] + noise.float()).to(trained[key].dtype)
        return released

    def record_round(self, names: list[str]) -> None:
        """Client unit: every client's accountant takes one step per round, whether or not it was sampled."""
        for name in names:
            self.record_step(name)

    def sample_batch(self, name: str) -> list[int]:
        """Poisson sampling from the client's secret stream: each example joins independently with rate q."""
        client = self.clients[name]
        mask = torch.rand(client.num_examples, generator=client.sampling_generator) < client.sample_rate
        return mask.nonzero().flatten().tolist()

    def record_step(self, name: str) -> None:
        client = self.clients[name]
        client.accountant.step(noise_multiplier=client.noise_multiplier, sample_rate=client.sample_rate)

    # --- reporting ----------------------------------------------------------------------
    def _reported_clients(self) -> dict[str, ClientPrivacy]:
        """Every client whose data the adapter carries: this run's and those of a composed earlier run."""
        return {**self._past_clients, **self.clients}

    def epsilon(self, name: str, client: ClientPrivacy | None = None) -> float:
        """The client's epsilon from its history; recomputed only when the history changed since the last call
        (with 1,000 clients and 10 per round, a round's log recomputes 10)."""
        client = client if client is not None else self._reported_clients()[name]
        history = tuple(client.history)
        cached = self._epsilon_cache.get(name)
        if cached is None or cached[0] != history:
            cached = (history, epsilon_from_history(history, self.delta, self.accountant_name))
            self._epsilon_cache[name] = cached
        return cached[1]

    def max_epsilon(self) -> float:
        return max((self.epsilon(name, c) for name, c in self._reported_clients().items()), default=0.0)

    def report(self) -> dict[str, Any]:
        """Everything needed to re-derive each client's epsilon with an independent accountant."""
        if not self.enabled:
            return {"private": False, "unit": None, "epsilon": None, "clients": {}}
        clients = {
            name: {
                "epsilon": self.epsilon(name, c),
                "num_examples": c.num_examples,
                "noise_multiplier": c.noise_multiplier,
                "sample_rate": c.sample_rate,
                "steps": c.steps_taken,
                **({"releases_per_round": c.releases_per_step} if self.unit == "client" else {}),
                "history": [list(entry) for entry in c.history],
            }
            for name, c in self._reported_clients().items()
        }
        return {
            "private": True,
            "unit": self.unit,
            "epsilon": max((c["epsilon"] for c in clients.values()), default=0.0),
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
            # True when the sampling and noise came from a user's secret seed: then the guarantee holds only
            # while that seed stays secret. The seed itself is never recorded.
            "seeded": self.seeded,
            "clients": clients,
        }

    # --- saving and restoring (private: checkpoints and the on-disk ledger, never published) ------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: each client's spent history, noise, budget and secret RNG states.

        JSON-safe (RNG states as base64). It holds the secret streams: keep it private, never publish it.
        """
        return {
            "clients": {name: _client_state(c) for name, c in self.clients.items()},
            "past_clients": {name: _client_state(c) for name, c in self._past_clients.items()},
            "participation_generator": _encode_state(self._participation_generator.get_state()),
            "client_rate": self.client_rate,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.clients = {name: self.client_from_state(s, device) for name, s in state["clients"].items()}
        self._past_clients = {name: self.client_from_state(s, device) for name, s in state["past_clients"].items()}
        self._participation_generator.set_state(_decode_state(state["participation_generator"]))
        self.client_rate = float(state["client_rate"])

    def client_state(self, name: str) -> dict[str, Any]:
        """One client's part of `state_dict` (a driver that keeps each client's ledger on its own disk)."""
        return _client_state(self.clients[name])

    def load_client_state(self, name: str, state: Mapping[str, Any], device: torch.device) -> None:
        self.clients[name] = self.client_from_state(state, device)

    def catch_up_with_ledger(self, ledger: Mapping[str, Any], device: torch.device) -> list[str]:
        """After a crash: take each client's state from the ledger where it ran further than the checkpoint.

        The ledger is written before a client releases anything, so steps of a round lost in the crash are
        counted (epsilon may be over-counted, never under-counted) and the noise and sampling streams continue
        instead of replaying. A target-calibrated client that ran extra steps gets new noise for what is left
        (see `plan`). Returns the clients that were behind.
        """
        behind = []
        for name, saved in ledger.get("clients", {}).items():
            client = self.clients.get(name)
            steps = sum(int(n) for _, _, n in saved["history"])
            if client is None or steps <= client.steps_taken:
                continue
            self.clients[name] = self.client_from_state(saved, device)
            self._recalibrate.add(name)
            behind.append(name)
        return behind

    def client_from_state(self, s: Mapping[str, Any], device: torch.device) -> ClientPrivacy:
        """A client's privacy state from `client_state` (JSON-safe, RNG states in base64)."""
        accountant = make_accountant(self.accountant_name)
        accountant.history = [(float(a), float(b), int(c)) for a, b, c in s["history"]]
        noise_generator = torch.Generator(device=device)
        noise_generator.set_state(_decode_state(s["noise_generator"]))
        sampling_generator = torch.Generator()
        sampling_generator.set_state(_decode_state(s["sampling_generator"]))
        return ClientPrivacy(
            num_examples=int(s["num_examples"]),
            sample_rate=float(s["sample_rate"]),
            noise_multiplier=float(s["noise_multiplier"]),
            step_budget=s["step_budget"],
            accountant=accountant,
            noise_generator=noise_generator,
            sampling_generator=sampling_generator,
            releases_per_step=int(s.get("releases_per_step", 1)),
        )


def _client_state(c: ClientPrivacy) -> dict[str, Any]:
    return {
        "num_examples": c.num_examples,
        "sample_rate": c.sample_rate,
        "noise_multiplier": c.noise_multiplier,
        "step_budget": c.step_budget,
        "releases_per_step": c.releases_per_step,
        "history": [list(entry) for entry in c.history],
        "noise_generator": _encode_state(c.noise_generator.get_state()),
        "sampling_generator": _encode_state(c.sampling_generator.get_state()),
    }


def _encode_state(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
