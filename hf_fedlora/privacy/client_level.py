"""Client-level DP as DP-FedAvg (McMahan et al., 2018): the unit of privacy is all of one client's data.

Each sampled client trains without per-example clipping and clips its whole round update (every tensor it sends,
together; or per tensor) to C. The aggregator re-clips each update (a no-op for an honest client), sums them, adds
Gaussian noise N(0, sigma^2 C^2) ONCE to the sum, and divides by a fixed expected count W = q x N, never by who took
part: the noise in the published adapter says nothing about how many clients took part. One accountant runs over
rounds at the client-sampling rate q. A method that releases twice a round (DEeR) gets noise sigma sqrt(2) C on each
release, so a round is one Gaussian mechanism at sigma.

The neighbouring relation is named, as Flower's PrivacyConfig names it:
- "add_or_remove_one": clients take part by secret Poisson sampling at rate q; which clients there are, their names,
  sizes, and who took part in any round (or how many, or who failed) are never published. q and W are public
  parameters of the mechanism, fixed from the planned population.
- "replace_one": the client list is public; one client's data replaced by another's moves the sum by up to 2C,
  accounted as such. Every client takes part in every round (no sampling is analysed for this relation here).
- "zero_out_one": the client list is public and every client takes part in every round; one client's data removed,
  the client staying (its update zero, and under distributed noise its noise share still added), moves the sum by
  up to C: at sample rate 1 the same Gaussian mechanism as add/remove. Distributed noise needs a relation under
  which the client stays: a client that left would take its noise share with it, and the noise's energy would say
  it had gone.

Trust: with the noise placed centrally (the default) the aggregator sees the clipped updates before the noise
(central DP). With dp_noise_placement="distributed" each client adds its share of discrete Gaussian noise to its
encoded update and a secure sum gives the aggregator only the noised sum (`distributed_noise`); every client then
takes part in every round, and the plan counts only the shares of the fewest clients allowed to finish a round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..federation.secure_mean import ModularSum
from .accountants import epsilon_from_history, make_accountant
from .calibration import calibrate_noise_multiplier
from .distributed_noise import (
    DistributedNoisePlan,
    decode,
    plan_distributed_noise,
    rotation_signs,
)
from .dp_optimizer import CLIPPINGS
from .mechanism import DPMechanism, derived_seed, mechanism_arguments
from .noise import draw_noise
from .state import decode_generator_state, encode_generator_state, merged_history, steps_of

ADD_OR_REMOVE_ONE, REPLACE_ONE, ZERO_OUT_ONE = "add_or_remove_one", "replace_one", "zero_out_one"
NEIGHBOURING_RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE, ZERO_OUT_ONE)
PUBLIC_ROSTER = (REPLACE_ONE, ZERO_OUT_ONE)  # the client list is public; every client takes part in every round
CENTRAL, DISTRIBUTED = "central", "distributed"
SIMULATED_SECURE_SUM = "simulated in process"
DISTRIBUTED_RELATION_ERROR = (
    "dp_noise_placement='distributed' needs dp_neighbouring_relation='zero_out_one' (or 'replace_one'): under "
    "'add_or_remove_one' a client that left would take its noise share with it, and the noise's energy would say it "
    "had gone. Under 'zero_out_one' the client list is public and a client's data are protected: removing them "
    "leaves the client sending a zero update with its share."
)
NOISE_PLACEMENTS = (CENTRAL, DISTRIBUTED)
AGGREGATOR, NOISE_STREAM, PARTICIPATION_STREAM = 0, 3, 4  # the aggregator's own streams


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float, clipping: str) -> dict[str, torch.Tensor]:
    """The update scaled to norm at most `clip_norm`, in float32: all tensors together ("flat"), or each of the P
    tensors to clip_norm / sqrt(P) ("per_layer", so the whole update is still within clip_norm)."""
    if clipping not in CLIPPINGS:
        raise ValueError(f"clipping must be one of {list(CLIPPINGS)}, got {clipping!r}")
    update = {key: tensor.detach().float() for key, tensor in update.items()}
    if not update:
        return {}
    if clipping == "per_layer":
        threshold = clip_norm / math.sqrt(len(update))
        return {key: u * min(1.0, threshold / (float(u.norm()) + 1e-12)) for key, u in update.items()}
    norm = float(torch.sqrt(sum((u.double() ** 2).sum() for u in update.values())))
    scale = min(1.0, clip_norm / (norm + 1e-12))
    return {key: u * scale for key, u in update.items()}


def add_or_remove_equivalent(history: Iterable[Iterable[float]], relation: str) -> list[tuple[float, float, int]]:
    """The history the add/remove accountants account for this relation. Replace-one with every client in every
    round is the Gaussian mechanism at sensitivity 2C, i.e. add/remove at noise multiplier sigma / 2; zero-out-one
    at sample rate 1 is the Gaussian mechanism at sensitivity C, as add/remove."""
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if relation not in PUBLIC_ROSTER:
        return history
    if any(q != 1.0 for _, q, n in history if n):
        raise ValueError(f"{relation} is accounted here for full participation (sample rate 1) only")
    return [(s / 2, q, n) for s, q, n in history] if relation == REPLACE_ONE else history


def client_level_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str, relation: str):
    """Epsilon of a client-level history under the relation."""
    return epsilon_from_history(add_or_remove_equivalent(history, relation), delta, accountant)


class ClientLevelPrivacy(DPMechanism):
    """The aggregator's side of DP-FedAvg: secret participation, one noise per release, one accountant."""

    unit = "client"

    def __init__(
        self,
        *,
        target_epsilon: float | None,
        target_delta: float,
        noise_multiplier: float | None,
        clip_norm: float,
        clipping: str = "flat",
        accountant: str = "prv",
        relation: str = ADD_OR_REMOVE_ONE,
        secret_seed: int | None = None,
        secure_mode: bool = False,
        noise_placement: str = CENTRAL,
        secure_sum_bits: int = 20,
    ):
        if relation not in NEIGHBOURING_RELATIONS:
            choices = list(NEIGHBOURING_RELATIONS)
            raise ValueError(f"dp_neighbouring_relation must be one of {choices}, got {relation!r}")
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
        if noise_placement not in NOISE_PLACEMENTS:
            raise ValueError(f"dp_noise_placement must be one of {list(NOISE_PLACEMENTS)}, got {noise_placement!r}")
        if noise_placement == DISTRIBUTED and relation not in PUBLIC_ROSTER:
            raise ValueError(DISTRIBUTED_RELATION_ERROR)
        self.relation = relation
        self.noise_placement = noise_placement
        self.secure_sum_bits = secure_sum_bits
        self.distributed: DistributedNoisePlan | None = None  # set by plan() under distributed noise
        self.secure_sum = SIMULATED_SECURE_SUM  # how the uploads are summed under distributed noise (the driver's)
        root = self._secret_root
        self._noise_generator = torch.Generator().manual_seed(derived_seed(root, AGGREGATOR, NOISE_STREAM))
        self._participation_generator = torch.Generator().manual_seed(
            derived_seed(root, AGGREGATOR, PARTICIPATION_STREAM)
        )
        self.noise_multiplier: float | None = None
        self.sample_rate = 1.0
        self.expected_clients = 0.0
        self.releases_per_round = 1
        self.round_budget: int | None = None
        self.prior_history: list[tuple[float, float, int]] = []
        self.accountant = make_accountant(accountant)

    # --- before training --------------------------------------------------------------------------
    def plan(
        self,
        num_clients: int,
        clients_per_round: int | None,
        rounds: int,
        releases_per_round: int,
        *,
        upload_size: int = 0,
        min_clients: int | None = None,
    ) -> None:
        """Fix q = W / N, the expected count W and sigma for `rounds` more rounds; refuse a plan over the target.
        Under distributed noise also the encoding (`upload_size`: the largest release, in numbers) for at least
        `min_clients` surviving shares.

        Called again for a later `train()` of the same run: sigma stays, the budget grows if the target allows."""
        if self.noise_placement == DISTRIBUTED:
            self._plan_distributed(num_clients, clients_per_round, rounds, releases_per_round, upload_size, min_clients)
            return
        expected = clients_per_round or num_clients
        if self.relation in PUBLIC_ROSTER and expected != num_clients:
            raise ValueError(
                f"dp_neighbouring_relation={self.relation!r} is accounted for full participation only, but "
                f"clients_per_round={clients_per_round} of {num_clients} clients. Leave clients_per_round unset, or "
                "use 'add_or_remove_one' (secret Poisson sampling of clients, amplified)."
            )
        if self.delta >= 1.0 / num_clients:
            raise ValueError(
                f"dp_target_delta={self.delta} is not below 1/N for the N={num_clients} clients (unit: one client): a "
                "delta that large allows releasing a whole client's data. Use a delta far below 1/N."
            )
        self.sample_rate = expected / num_clients
        self.expected_clients = float(expected)
        self.releases_per_round = releases_per_round
        if self.noise_multiplier is None:
            self.noise_multiplier = self._calibrate(rounds)
        self._refuse_overspending(rounds)
        self.round_budget = self.rounds_run + rounds

    def _plan_distributed(self, num_clients, clients_per_round, rounds, releases_per_round, upload_size, min_clients):
        if clients_per_round is not None and clients_per_round != num_clients:
            raise ValueError(
                "dp_noise_placement='distributed' needs every client in every round: leave clients_per_round unset"
            )
        if self.prior_history:
            raise ValueError(
                "Continuing an adapter under dp_noise_placement='distributed' is not supported: its accounting "
                "composes one plan. Set dp_new_privacy_budget=True only if this run's data are disjoint."
            )
        min_shares = min(min_clients or num_clients, num_clients)
        if self.delta >= 1.0 / num_clients:
            raise ValueError(f"dp_target_delta={self.delta} is not below 1/N for the N={num_clients} clients")
        self.sample_rate, self.expected_clients, self.releases_per_round = 1.0, float(num_clients), releases_per_round
        if self.distributed is None:
            self.distributed = plan_distributed_noise(
                target_epsilon=self.target_epsilon,
                noise_multiplier=self.fixed_noise_multiplier,
                delta=self.delta,
                clip_norm=self.clip_norm,
                upload_size=upload_size,
                bits=self.secure_sum_bits,
                clients=num_clients,
                min_shares=min_shares,
                rounds=rounds,
                releases_per_round=releases_per_round,
                sensitivity_factor=2.0 if self.relation == REPLACE_ONE else 1.0,
            )
            self.noise_multiplier = self.distributed.noise_multiplier
        if self.target_epsilon is not None:
            epsilon = self.distributed.epsilon(self.rounds_run + rounds, self.delta)
            if epsilon > self.target_epsilon:
                raise ValueError(
                    f"This plan would exceed dp_target_epsilon={self.target_epsilon} (unit: one client, distributed "
                    f"noise): {self.rounds_run} rounds already run + {rounds} planned -> epsilon {epsilon:.3f}; "
                    "nothing was trained."
                )
        self.round_budget = self.rounds_run + rounds

    def _calibrate(self, rounds: int) -> float:
        if self.fixed_noise_multiplier is not None:
            return float(self.fixed_noise_multiplier)
        effective = calibrate_noise_multiplier(
            self.target_epsilon,
            self.delta,
            self.sample_rate,
            rounds,
            self.accountant_name,
            prior_history=tuple(add_or_remove_equivalent(self.prior_history, self.relation)),
        )
        return 2 * effective if self.relation == REPLACE_ONE else effective

    def _refuse_overspending(self, rounds: int) -> None:
        if self.target_epsilon is None:
            return
        projected = self.history + [(self.noise_multiplier, self.sample_rate, rounds)]
        epsilon = client_level_epsilon(projected, self.delta, self.accountant_name, self.relation)
        if epsilon > self.target_epsilon:
            raise ValueError(
                f"This plan would exceed dp_target_epsilon={self.target_epsilon} (unit: one client, delta={self.delta}"
                f", {self.accountant_name}): {self.rounds_run} rounds already run + {rounds} planned at noise "
                f"multiplier {self.noise_multiplier:.4g}, sample rate {self.sample_rate:.4g} -> epsilon "
                f"{epsilon:.3f}; nothing was trained."
            )

    def compose_with(self, prior_privacy: Mapping[str, Any]) -> None:
        """Continue an adapter trained under client-level DP: its rounds count first (the same clients)."""
        if prior_privacy.get("unit") != "client":
            raise ValueError(
                f"The adapter was trained under privacy unit {prior_privacy.get('unit')!r}; this run's unit is "
                "'client': they cannot be composed. Set dp_new_privacy_budget=True only if this run's data are "
                "disjoint from that run's."
            )
        if prior_privacy.get("neighbouring_relation", ADD_OR_REMOVE_ONE) != self.relation:
            raise ValueError(
                f"The adapter was trained under dp_neighbouring_relation={prior_privacy.get('neighbouring_relation')!r}"
                f", this run uses {self.relation!r}: one guarantee cannot compose the two."
            )
        history = prior_privacy.get("history") or []
        self.prior_history = [(float(s), float(q), int(n)) for s, q, n in history]

    # --- during training --------------------------------------------------------------------------
    def sample_participants(self, names: list[str]) -> list[str]:
        """Each client takes part independently with probability q, from secret randomness (amplification by
        sampling holds only while nobody can tell who took part)."""
        if self.sample_rate >= 1.0:
            return list(names)
        generator = self._generator(self._participation_generator)
        draws = torch.rand(len(names), generator=generator)
        return [name for name, draw in zip(names, draws.tolist(), strict=True) if draw < self.sample_rate]

    def can_run_round(self) -> bool:
        return self.round_budget is None or self.rounds_run < self.round_budget

    def record_round(self) -> None:
        """One accounted round, counted BEFORE its noise is drawn: a round that fails half-way is still spent."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def aggregator(self, keys: Iterable[str], round_index: int = 0, sub_round: int = 0, public_seed: int = 0):
        """A sum of clipped updates over the released tensors `keys`, for one release (sub-round): the plain sum
        (central noise) or the secure sum of encoded uploads (distributed noise)."""
        if self.distributed is not None:
            return DistributedSum(
                self, list(keys), rotation_signs(public_seed, round_index, sub_round, self.distributed.dimension)
            )
        return DPFedAvgSum(self, list(keys))

    # --- reporting --------------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Any) -> ClientLevelPrivacy:
        """The aggregator's mechanism a run's `FederatedTrainingArguments` describe (every driver builds it so)."""
        return cls(
            **mechanism_arguments(args),
            relation=args.dp_neighbouring_relation,
            noise_placement=args.dp_noise_placement,
            secure_sum_bits=args.secure_sum_bits,
        )

    @property
    def rounds_run(self) -> int:
        return steps_of(self.accountant.history)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return merged_history(self.prior_history + [tuple(entry) for entry in self.accountant.history])

    def epsilon(self) -> float:
        if self.distributed is not None:
            return self.distributed.epsilon(self.rounds_run, self.delta)
        return client_level_epsilon(self.history, self.delta, self.accountant_name, self.relation)

    def max_epsilon(self) -> float:
        return self.epsilon()

    def report(self) -> dict[str, Any]:
        """What the record publishes: the federation's one history, no client names, sizes or counts."""
        if not self.enabled:
            return {"private": False, "unit": None, "epsilon": None, "clients": {}}
        history = self.history
        return {
            "private": True,
            "unit": "client",
            "neighbouring_relation": self.relation,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant_name,
            "clip_norm": self.clip_norm,
            "clipping": self.clipping,
            "noise_calibration": "target" if self.target_epsilon is not None else "fixed",
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_clients_per_round": self.expected_clients,
            "releases_per_round": self.releases_per_round,
            "rounds": steps_of(history),
            "history": [list(entry) for entry in history],
            "secure_mode": self.secure_mode,
            "seeded": self.seeded,
            "clients": {},
            **self._placement_report(),
        }

    def _placement_report(self) -> dict[str, Any]:
        if self.distributed is None:
            return {"noise_placement": CENTRAL}
        return {
            "noise_placement": DISTRIBUTED,
            "accountant": "rdp_distributed_discrete_gaussian",
            "distributed_noise": self.distributed.to_dict(),
            "secure_sum": self.secure_sum,
        }

    # --- secret state (the secret store, never beside artefacts) ----------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "expected_clients": self.expected_clients,
            "releases_per_round": self.releases_per_round,
            "round_budget": self.round_budget,
            "prior_history": [list(entry) for entry in self.prior_history],
            "history": [list(entry) for entry in self.accountant.history],
            "distributed": self.distributed.to_dict() if self.distributed is not None else None,
            "noise_generator": encode_generator_state(self._noise_generator),
            "participation_generator": encode_generator_state(self._participation_generator),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise_multiplier = state["noise_multiplier"]
        self.sample_rate = float(state["sample_rate"])
        self.expected_clients = float(state["expected_clients"])
        self.releases_per_round = int(state["releases_per_round"])
        self.round_budget = state["round_budget"]
        self.prior_history = [(float(s), float(q), int(n)) for s, q, n in state["prior_history"]]
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        distributed = state.get("distributed")
        self.distributed = DistributedNoisePlan.from_dict(distributed) if distributed else None
        decode_generator_state(self._noise_generator, state["noise_generator"])
        decode_generator_state(self._participation_generator, state["participation_generator"])


class DPFedAvgSum:
    """One release of DP-FedAvg: clipped updates summed; the noise added once; divided by the expected count."""

    def __init__(self, privacy: ClientLevelPrivacy, keys: list[str]):
        self.privacy = privacy
        self.keys = keys
        self._sum: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def add(self, update: Mapping[str, torch.Tensor]) -> None:
        """Fold one client's update in, clipped again here so the bound never rests on the client."""
        if set(update) != set(self.keys):
            raise ValueError(
                f"a client-level update must hold exactly the released tensors; it differs in "
                f"{sorted(set(update) ^ set(self.keys))[:3]}"
            )
        clipped = clip_update(update, self.privacy.clip_norm, self.privacy.clipping)
        for key, tensor in clipped.items():
            self._sum[key] = self._sum[key] + tensor if key in self._sum else tensor.clone()

    @torch.no_grad()
    def release(self, global_state: Mapping[str, torch.Tensor], regulate: bool) -> dict[str, torch.Tensor]:
        """global + (sum + noise) / W for every released tensor; the noise is drawn even when nobody took part.
        DEeR's regulator shapes the noise by the current (public) global peer factor."""
        privacy = self.privacy
        std = privacy.noise_multiplier * math.sqrt(privacy.releases_per_round) * privacy.clip_norm
        generator = privacy._generator(privacy._noise_generator)
        released = {}
        for key in self.keys:
            start = global_state[key]
            total = self._sum.get(key, torch.zeros(start.shape, dtype=torch.float32, device=start.device))
            noise = draw_noise(key, start.shape, global_state, std, generator, regulate, privacy.secure_mode)
            step = (total + noise.float().to(total.device)) / privacy.expected_clients
            released[key] = (start.float() + step).to(start.dtype)
        return released


class DistributedSum:
    """One release under distributed noise: the secure sum of the clients' encoded uploads (each clipped, rounded
    and carrying its noise share), decoded and divided by the expected count. The aggregator adds no noise and, in
    a real deployment, sees only the modular sum; refused if fewer shares than planned survived."""

    def __init__(self, privacy: ClientLevelPrivacy, keys: list[str], signs: torch.Tensor):
        self.privacy = privacy
        self.keys = keys
        self.signs = signs
        self.plan = privacy.distributed
        self.sum = ModularSum(self.plan.dimension, self.plan.bits)

    @property
    def shares(self) -> int:
        return self.sum.count

    def add(self, upload: Mapping[str, torch.Tensor]) -> None:
        """One client's encoded upload (the secure sum simulated in process), or a secure sum's result."""
        self.sum.add(upload)

    @torch.no_grad()
    def release(self, global_state: Mapping[str, torch.Tensor], regulate: bool) -> dict[str, torch.Tensor]:
        if self.shares < self.plan.min_shares:
            raise RuntimeError(
                f"only {self.shares} of the planned minimum {self.plan.min_shares} noise shares arrived: the sum would "
                "carry less noise than accounted, so nothing is released"
            )
        total = decode(
            self.sum.total, self.plan, self.signs, {key: tuple(global_state[key].shape) for key in self.keys}
        )
        released = {}
        for key in self.keys:
            start = global_state[key]
            released[key] = (start.float() + total[key].to(start.device) / self.privacy.expected_clients).to(
                start.dtype
            )
        return released
