"""DEeR and RoLoRA: exact aggregation by alternation, the ablation switches, accounting, and the noise regulator.

As specified in docs/algorithms.md (#deer, #rolora and #deer-noise-regulator).
"""

from __future__ import annotations

import json

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import DeerConfig, FederatedTrainer, FedLoraConfig, RoLoraConfig
from hf_fedlora.federation.adapter_state import HEAD, LORA_A, LORA_B, factor_of, payload_nbytes
from hf_fedlora.privacy.noise_regulator import regulated_noise

SIZES = [10, 20, 30]  # unequal clients: a wrong weighting would show


class RecordingTrainer(FederatedTrainer):
    """Records every client's full adapter right after its local work, and every server aggregation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_records: list[dict] = []
        self.aggregations: list[dict] = []
        aggregate = self.method.aggregate

        def recording_aggregate(uploads, weights):
            result = aggregate(uploads, weights)
            self.aggregations.append({"uploads": uploads, "weights": list(weights), "result": result})
            return result

        self.method.aggregate = recording_aggregate
        # Every upload through the batch aggregate, so it can be recorded (streaming gives the same result:
        # tests/test_streaming_aggregation.py).
        self.method.streaming_aggregator = lambda: None

    def local_round(self, name, round_index, sub_round, steps):
        upload, losses = super().local_round(name, round_index, sub_round, steps)
        self.client_records.append(
            {"client": name, "round": round_index, "sub_round": sub_round, "upload": upload, "adapter": adapter(self)}
        )
        return upload, losses


def adapter(trainer: FederatedTrainer) -> dict[str, torch.Tensor]:
    """Detached copies of the model's adapter tensors (LoRA factors and head), by name."""
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if factor_of(n) is not None}


def names_of(state, factor: str) -> set[str]:
    return {name for name in state if factor_of(name) == factor}


def adapted_layers(state) -> list[tuple[str, str]]:
    """(A name, B name) of every adapted layer."""
    return [(a, a.replace(".lora_A.", ".lora_B.")) for a in sorted(names_of(state, LORA_A))]


def split_clients(sizes, seed=0):
    data = toy_dataset(n=sum(sizes), seed=seed)
    clients, start = [], 0
    for size in sizes:
        clients.append(data.select(range(start, start + size)))
        start += size
    return clients


def run_recorded(
    tmp_path, config_cls, rounds, args: dict | None = None, **config_kwargs
) -> tuple[RecordingTrainer, dict[str, torch.Tensor]]:
    """Train (weight decay on, so a frozen-but-optimised factor would move) and return the initial adapter."""
    overrides = {"num_rounds": rounds, "num_clients": None, "local_steps": 3, "weight_decay": 0.1, **(args or {})}
    trainer = RecordingTrainer(
        model=tiny_peft(config_cls, **config_kwargs),
        args=fed_args(tmp_path, **overrides),
        train_dataset=split_clients(SIZES),
    )
    initial = adapter(trainer)
    trainer.output = trainer.train()
    return trainer, initial


def replay_server(trainer: RecordingTrainer, initial: dict[str, torch.Tensor]):
    """Per aggregation: (the server's state before it, after it, the client records of that sub-round)."""
    server = dict(initial)
    steps = []
    per_sub_round = len(SIZES)
    for index, aggregation in enumerate(trainer.aggregations):
        records = trainer.client_records[index * per_sub_round : (index + 1) * per_sub_round]
        assert len({(r["round"], r["sub_round"]) for r in records}) == 1
        before = dict(server)
        server.update(aggregation["result"])
        steps.append((before, dict(server), records))
    return steps


def deviation(records, server_after, a_key, b_key) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_k p_k B_k A_k - B_bar A_bar, sum_k p_k B_k A_k) for one layer, p_k proportional to client size."""
    p = [size / sum(SIZES) for size in SIZES]
    mean_product = sum(
        pk * r["adapter"][b_key].double() @ r["adapter"][a_key].double() for pk, r in zip(p, records, strict=True)
    )
    product_of_means = server_after[b_key].double() @ server_after[a_key].double()
    return mean_product - product_of_means, mean_product


EXPECTED_SCHEDULES = {
    # (round, sub_round) -> the LoRA factor trained, in order of the server's aggregations
    "deer": [(0, 0, LORA_B), (0, 1, LORA_A), (1, 0, LORA_B), (1, 1, LORA_A)],
    "rolora": [(0, 0, LORA_B), (1, 0, LORA_A), (2, 0, LORA_B)],
}
ALTERNATING = [(DeerConfig, "deer", 2), (RoLoraConfig, "rolora", 3)]


# --------------------------------------------------------------------------------------
# 1. Exact aggregation by alternation, frozen peer, upload contents
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("config_cls", "method", "rounds"), ALTERNATING, ids=["deer", "rolora"])
def test_alternation_aggregates_exactly_and_keeps_the_peer_frozen(tmp_path, config_cls, method, rounds):
    """After every DEeR sub-round / RoLoRA round, B_bar @ A_bar is the weighted mean of the clients' B_k @ A_k;
    the frozen factor is bit-identical on every client and on the server; uploads hold the trained factor + head."""
    trainer, initial = run_recorded(tmp_path, config_cls, rounds)
    steps = replay_server(trainer, initial)
    schedule = EXPECTED_SCHEDULES[method]
    assert len(steps) == len(schedule)
    layers = adapted_layers(initial)
    assert len(layers) == 4  # query and value in 2 layers
    heads = names_of(initial, HEAD)
    assert heads

    for (before, after, records), (round_index, sub_round, trained) in zip(steps, schedule, strict=True):
        frozen = LORA_A if trained == LORA_B else LORA_B
        assert [(r["round"], r["sub_round"]) for r in records] == [(round_index, sub_round)] * len(SIZES)
        for record in records:
            # the upload: exactly the trained factor and the head
            assert set(record["upload"]) == names_of(initial, trained) | heads
            # the frozen factor: bit-identical to the server's on every client (weight decay is on)
            for name in names_of(initial, frozen):
                assert torch.equal(record["adapter"][name], before[name]), f"{record['client']}: {name} moved"
        # the server leaves the frozen factor alone and really moved the trained one
        for name in names_of(initial, frozen):
            assert torch.equal(after[name], before[name])
        assert all(not torch.equal(after[n], before[n]) for n in names_of(initial, trained))
        for a_key, b_key in layers:
            gap, mean_product = deviation(records, after, a_key, b_key)
            assert mean_product.abs().max() > 1e-4  # not 0 == 0
            assert gap.abs().max() <= 1e-5 * mean_product.abs().max(), f"{a_key}: deviation {gap.abs().max()}"

    # the server's final adapter is what the replay says: nothing happened outside the recorded aggregations
    final = adapter(trainer)
    assert all(torch.equal(final[name], steps[-1][1][name]) for name in final)


def test_lora_baseline_has_a_nonzero_deviation_control(tmp_path):
    """Control: FedLoraConfig (A and B trained jointly, averaged separately) leaves a clear deviation."""
    trainer, initial = run_recorded(tmp_path, FedLoraConfig, rounds=2)
    steps = replay_server(trainer, initial)
    assert len(steps) == 2
    _, after, records = steps[-1]
    relative = []
    for a_key, b_key in adapted_layers(initial):
        gap, mean_product = deviation(records, after, a_key, b_key)
        relative.append(float(gap.abs().max() / mean_product.abs().max()))
    assert min(relative) > 1e-3, relative  # two orders of magnitude above the bound the alternating methods meet


@pytest.mark.parametrize(("config_cls", "rounds"), [(DeerConfig, 1), (RoLoraConfig, 2)], ids=["deer", "rolora"])
def test_alternating_upload_lora_part_is_half_of_lora(tmp_path, config_cls, rounds):
    """On the tiny BERT's square query/value layers, each upload's LoRA part is half of FedLoraConfig's bytes."""
    trainer, _ = run_recorded(tmp_path / "alt", config_cls, rounds)
    baseline, _ = run_recorded(tmp_path / "lora", FedLoraConfig, 1)

    def lora_bytes(upload):
        return payload_nbytes({k: v for k, v in upload.items() if factor_of(k) in (LORA_A, LORA_B)})

    lora = lora_bytes(baseline.client_records[0]["upload"])
    assert lora > 0
    assert {r["sub_round"] if config_cls is DeerConfig else r["round"] for r in trainer.client_records} == {0, 1}
    for record in trainer.client_records:  # B uploads and A uploads alike
        assert 2 * lora_bytes(record["upload"]) == lora


# --------------------------------------------------------------------------------------
# 2. DEeR's ablation switches
# --------------------------------------------------------------------------------------
def contract_profile(config) -> dict:
    """Everything the method tells the trainer and the privacy layer, over a few rounds, sub-rounds and steps."""
    method = config.build_method()
    profile = {"regulates_noise": method.regulates_noise(), "filter": method.noisy_gradient_filter()}
    profile["lr_scale"] = {f: method.learning_rate_scale(f) for f in (LORA_A, LORA_B, HEAD)}
    profile["sub_rounds"] = [method.num_sub_rounds(r) for r in range(4)]
    profile["trained"] = {
        (r, s, step): method.trained_factors(r, s, step) for r in range(4) for s in range(2) for step in range(3)
    }
    profile["uploaded"] = {(r, s): method.uploaded_factors(r, s) for r in range(4) for s in range(2)}
    return profile


def test_each_deer_switch_changes_exactly_what_it_names():
    """deviation_eliminator changes only sub-rounds and factors; noise_regulator only regulates_noise()."""
    base = dict(r=4, target_modules=["query"])
    default = contract_profile(DeerConfig(**base))
    no_eliminator = contract_profile(DeerConfig(deviation_eliminator=False, **base))
    no_regulator = contract_profile(DeerConfig(noise_regulator=False, **base))

    assert default["regulates_noise"] is True and default["sub_rounds"] == [2, 2, 2, 2]
    assert all(factors == {(LORA_B, LORA_A)[s], HEAD} for (_, s, _), factors in default["trained"].items())
    assert default["uploaded"][(0, 0)] == {LORA_B, HEAD} and default["uploaded"][(3, 1)] == {LORA_A, HEAD}

    changed = {key for key in default if default[key] != no_eliminator[key]}
    assert changed == {"sub_rounds", "trained", "uploaded"}
    assert no_eliminator["sub_rounds"] == [1, 1, 1, 1]
    assert all(no_eliminator["trained"][(r, 0, step)] == {LORA_A, LORA_B, HEAD} for r in range(4) for step in range(3))
    assert all(no_eliminator["uploaded"][(r, 0)] == {LORA_A, LORA_B, HEAD} for r in range(4))

    changed = {key for key in default if default[key] != no_regulator[key]}
    assert changed == {"regulates_noise"}
    assert no_regulator["regulates_noise"] is False


def test_deer_without_eliminator_trains_jointly_in_one_sub_round(tmp_path):
    """deviation_eliminator=False through the trainer: one aggregation per round, uploads carry A, B and head."""
    trainer, initial = run_recorded(tmp_path, DeerConfig, rounds=2, deviation_eliminator=False)
    assert len(trainer.aggregations) == 2
    assert all(record["sub_round"] == 0 for record in trainer.client_records)
    for record in trainer.client_records:
        assert set(record["upload"]) == set(initial)
        assert any(not torch.equal(record["adapter"][n], initial[n]) for n in names_of(initial, LORA_A))


def test_rolora_and_deer_do_not_regulate_noise_unless_asked():
    """RoLoRA has no regulator; DEeR has one by default."""
    assert RoLoraConfig(r=4, target_modules=["query"]).build_method().regulates_noise() is False
    assert DeerConfig(r=4, target_modules=["query"]).build_method().regulates_noise() is True


@pytest.mark.parametrize("field_name", ["deviation_eliminator", "noise_regulator"])
@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_deer_switches_accept_only_booleans(field_name, value):
    """A switch that is not True/False fails at construction and names itself."""
    with pytest.raises(ValueError, match=field_name):
        DeerConfig(r=4, target_modules=["query"], **{field_name: value})


@pytest.mark.parametrize(("eliminator", "regulator"), [(False, True), (True, False)])
def test_deer_switches_round_trip_through_save_and_from_pretrained(tmp_path, eliminator, regulator):
    """A saved DEeR run comes back as a DeerConfig with its switches, while adapter_config.json stays plain LoRA."""
    trainer = FederatedTrainer(
        tiny_peft(DeerConfig, deviation_eliminator=eliminator, noise_regulator=regulator, init_seed=3),
        fed_args(tmp_path, num_rounds=1, local_steps=1),
        train_dataset=toy_dataset(32),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))

    config = FedLoraConfig.from_pretrained(str(tmp_path / "saved"))
    assert type(config) is DeerConfig
    assert (config.deviation_eliminator, config.noise_regulator, config.init_seed) == (eliminator, regulator, 3)
    plain = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert not {"deviation_eliminator", "noise_regulator", "init_seed"} & set(plain)


def test_saved_rolora_run_loads_as_rolora(tmp_path):
    """FedLoraConfig.from_pretrained on a saved RoLoRA run gives back a RoLoraConfig."""
    trainer = FederatedTrainer(
        tiny_peft(RoLoraConfig), fed_args(tmp_path, num_rounds=1, local_steps=1), train_dataset=toy_dataset(32)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert type(FedLoraConfig.from_pretrained(str(tmp_path / "saved"))) is RoLoraConfig


# --------------------------------------------------------------------------------------
# 3. Under DP-SGD: every sub-round's steps are accounted
# --------------------------------------------------------------------------------------
def independent_rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Google's dp_accounting (RDP, on Opacus's orders >= 2), from (sigma, q, steps) alone."""
    accountant = RdpAccountant(orders=[order for order in RDPAccountant.DEFAULT_ALPHAS if order >= 2])
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("config_cls", "rounds", "steps_per_round"),
    [(DeerConfig, 2, 2 * 2), (RoLoraConfig, 2, 2)],  # local_steps=2; DEeR runs two local passes a round
    ids=["deer", "rolora"],
)
def test_dp_run_accounts_every_sub_round_and_stays_exact(tmp_path, config_cls, rounds, steps_per_round):
    """With DP-SGD (noise multiplier 1), each client's epsilon is an independent accountant's over
    rounds x sub-rounds x local steps, and alternation still aggregates exactly with the peer frozen."""
    dp = {"dp_noise_multiplier": 1.0, "local_steps": 2}
    trainer, initial = run_recorded(tmp_path, config_cls, rounds, args=dp)
    report = trainer.privacy_report()
    assert report["private"] is True and report["accountant"] == "rdp"
    assert trainer.output.metrics["epsilon"] == report["epsilon"]

    expected_steps = rounds * steps_per_round
    for name, size in zip([f"client_{i}" for i in range(len(SIZES))], SIZES, strict=True):
        client = report["clients"][name]
        assert client["steps"] == expected_steps
        assert client["sample_rate"] == 8 / size and client["noise_multiplier"] == 1.0
        independent = independent_rdp_epsilon(1.0, 8 / size, expected_steps, report["delta"])
        assert client["epsilon"] == pytest.approx(independent, rel=5e-3)  # fractional-order RDP differs ~0.1%
        # counting only one local pass per round would be a visibly different number
        fewer = independent_rdp_epsilon(1.0, 8 / size, rounds * 2, report["delta"])
        if steps_per_round != 2:
            assert client["epsilon"] > 1.05 * fewer
    assert report["epsilon"] == max(c["epsilon"] for c in report["clients"].values())

    for before, after, records in replay_server(trainer, initial):
        trained = {factor_of(n) for n in records[0]["upload"]} - {HEAD}
        assert len(trained) == 1
        frozen = ({LORA_A, LORA_B} - trained).pop()
        for record in records:
            assert all(torch.equal(record["adapter"][n], before[n]) for n in names_of(initial, frozen))
        for a_key, b_key in adapted_layers(initial):
            gap, mean_product = deviation(records, after, a_key, b_key)
            assert gap.abs().max() <= 1e-5 * mean_product.abs().max()


# --------------------------------------------------------------------------------------
# 4. The noise regulator (privacy/noise_regulator.py)
# --------------------------------------------------------------------------------------
M, N_IN, R = 6, 5, 3  # B is M x R, A is R x N_IN
STD = 0.7
DRAWS = 40_000  # rows of xi_B (columns of xi_A) per check: eigenvalue sampling error ~ sqrt(2 / DRAWS) = 0.7%
TOL = 0.04  # > 5 standard errors


def peer_with_singular_values(rows: int, cols: int, values, seed: int = 0) -> torch.Tensor:
    """A rows x cols float32 matrix with the given singular values and random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = len(values)
    return (u[:, :k] @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v[:, :k].T).float()


def rank_space_samples(trained: str, peer: torch.Tensor, std: float = STD, seed: int = 1) -> torch.Tensor:
    """DRAWS i.i.d. samples (as rows) of a row of xi_B, or of a column of xi_A, from one vectorised call."""
    generator = torch.Generator().manual_seed(seed)
    if trained == LORA_B:
        return regulated_noise(LORA_B, peer, (DRAWS, peer.shape[0]), std, generator).double()
    return regulated_noise(LORA_A, peer, (peer.shape[1], DRAWS), std, generator).double().T


def covariance(samples: torch.Tensor) -> torch.Tensor:
    """Empirical covariance of zero-mean samples (one per row)."""
    return samples.T @ samples / samples.shape[0]


def smallest_eigenvalue(samples: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(covariance(samples))[0])


def paper_noise_rows(peer_a: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Rows of xi_B = scale * N @ pinv(A), straight from the formula (N i.i.d. N(0, STD^2), one row per draw)."""
    noise = STD * torch.randn(DRAWS, peer_a.shape[1], generator=generator, dtype=torch.float64)
    return scale * noise @ torch.linalg.pinv(peer_a.double())


BIG, SMALL = (3.0, 1.5, 0.6), (0.8, 0.4, 0.25)  # sigma_max above 1, and below 1


@pytest.mark.parametrize("values", [BIG, SMALL], ids=["sigma_max_above_1", "sigma_max_below_1"])
@pytest.mark.parametrize("trained", [LORA_B, LORA_A])
def test_regulated_noise_is_at_least_nominal_in_every_direction(trained, values):
    """The regulated noise's covariance has smallest eigenvalue std^2 (never below nominal) and is the
    covariance of sigma_max * N @ pinv(A) (or sigma_max * pinv(B) @ N) derived from the formula."""
    peer = peer_with_singular_values(R, N_IN, values) if trained == LORA_B else peer_with_singular_values(M, R, values)
    samples = rank_space_samples(trained, peer)
    assert torch.isfinite(samples).all()
    smallest = smallest_eigenvalue(samples)
    assert smallest >= STD**2 * (1 - TOL)
    assert smallest <= STD**2 * (1 + TOL)  # c = sigma_max exactly: nominal along the top direction, not more

    # the formula, computed independently: rows of c N pinv(A) have covariance c^2 std^2 pinv(A)^T pinv(A);
    # columns of c pinv(B) N have covariance c^2 std^2 pinv(B) pinv(B)^T
    c = max(values)
    pinv = torch.linalg.pinv(peer.double())
    expected = c**2 * STD**2 * (pinv.T @ pinv if trained == LORA_B else pinv @ pinv.T)
    assert torch.linalg.norm(covariance(samples) - expected) <= TOL * torch.linalg.norm(expected)


def test_paper_c_equal_one_fails_the_nominal_check_when_sigma_max_exceeds_1():
    """Control: the paper's c = 1 puts less than nominal noise along A's top direction when sigma_max(A) > 1."""
    generator = torch.Generator().manual_seed(2)
    big = peer_with_singular_values(R, N_IN, BIG)
    assert smallest_eigenvalue(paper_noise_rows(big, 1.0, generator)) < STD**2 * (1 - TOL)
    assert smallest_eigenvalue(paper_noise_rows(big, 1.0, generator)) == pytest.approx(STD**2 / 9, rel=TOL)
    # the same formula with c = sigma_max passes, and c = 1 is fine when sigma_max < 1
    assert smallest_eigenvalue(paper_noise_rows(big, max(BIG), generator)) >= STD**2 * (1 - TOL)
    small = peer_with_singular_values(R, N_IN, SMALL)
    assert smallest_eigenvalue(paper_noise_rows(small, 1.0, generator)) >= STD**2 * (1 - TOL)


def weight_perturbation(trained: str, peer: torch.Tensor) -> torch.Tensor:
    """DRAWS samples (rows) of a row of xi_B @ A, or of a column of B @ xi_A."""
    if trained == LORA_B:
        return rank_space_samples(LORA_B, peer) @ peer.double()
    return rank_space_samples(LORA_A, peer) @ peer.double().T


def relative_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


@pytest.mark.parametrize("trained", [LORA_B, LORA_A])
def test_weight_perturbation_depends_on_the_peer_only_through_its_subspace_and_sigma_max(trained):
    """xi_B @ A = sigma_max(A) * N @ P_row(A) (and B @ xi_A = sigma_max(B) * P_col(B) @ N): rescaling the peer
    leaves the trained factor's noise unchanged in law and scales the weight perturbation by the same factor;
    a peer with the same singular vectors and sigma_max but another spread gives the same weight perturbation
    (isotropic noise would not)."""
    shape = (R, N_IN) if trained == LORA_B else (M, R)
    peer = peer_with_singular_values(*shape, BIG)
    flatter = peer_with_singular_values(*shape, (3.0, 2.9, 2.5))  # same singular vectors (same seed), same sigma_max
    reference = covariance(weight_perturbation(trained, peer))

    # analytic: sigma_max^2 std^2 times the orthogonal projector on the peer's row (column) space
    basis = peer.double() if trained == LORA_B else peer.double().T
    projector = torch.linalg.pinv(basis) @ basis
    assert relative_gap(reference, max(BIG) ** 2 * STD**2 * projector) <= TOL

    for alpha in (0.1, 10.0):
        scaled = alpha * peer
        assert (
            relative_gap(covariance(rank_space_samples(trained, scaled)), covariance(rank_space_samples(trained, peer)))
            <= TOL
        )
        assert relative_gap(covariance(weight_perturbation(trained, scaled)) / alpha**2, reference) <= TOL

    assert relative_gap(covariance(weight_perturbation(trained, flatter)), reference) <= TOL
    isotropic = STD**2 * basis.T @ basis  # the weight perturbation of plain N(0, std^2) noise on the trained factor
    flatter_basis = flatter.double() if trained == LORA_B else flatter.double().T
    assert relative_gap(STD**2 * flatter_basis.T @ flatter_basis, isotropic) > 10 * TOL


@pytest.mark.parametrize(
    ("trained", "peer_shape", "singular_values"),
    [
        (LORA_B, (R, N_IN), ()),  # zero A
        (LORA_A, (M, R), ()),  # zero B: B before its first sub-round
        (LORA_B, (R, N_IN), (2.0, 1.0)),  # rank 2 of 3
        (LORA_B, (R, N_IN), (2.0, 1.0, 2e-9)),  # third direction below float32's pinv cutoff
        (LORA_A, (M, R), (2.0, 1.0)),
        (LORA_B, (R, 2), (2.0, 1.0)),  # r = 3 > n = 2: A has at most 2 singular values
    ],
    ids=["zero_A", "zero_B", "rank2_A", "negligible_A", "rank2_B", "r_above_n"],
)
def test_zero_and_rank_deficient_peers_give_finite_noise_at_least_nominal(trained, peer_shape, singular_values):
    """Directions the peer does not span get nominal noise: finite, at least std^2, never blown up by 1 / s;
    a zero peer gives exactly isotropic nominal noise."""
    peer = peer_with_singular_values(*peer_shape, singular_values)
    samples = rank_space_samples(trained, peer)
    assert torch.isfinite(samples).all()
    eigenvalues = torch.linalg.eigvalsh(covariance(samples))
    assert eigenvalues[0] >= STD**2 * (1 - TOL)
    largest_factor = 2.0 if singular_values else 1.0  # sigma_max / s over the spanned directions: 2 / 1
    assert eigenvalues[-1] <= largest_factor**2 * STD**2 * (1 + TOL)
    if not singular_values:
        assert not peer.any()
        assert relative_gap(covariance(samples), STD**2 * torch.eye(R, dtype=torch.float64)) <= TOL


def test_regulated_noise_draws_only_from_the_given_generator_and_keeps_dtype():
    """Same generator state, same noise, whatever the global RNG; another seed, other noise; dtype and shape kept."""
    peer = peer_with_singular_values(R, N_IN, BIG)
    torch.manual_seed(0)
    first = regulated_noise(LORA_B, peer, (M, R), STD, torch.Generator().manual_seed(5))
    torch.manual_seed(1)
    again = regulated_noise(LORA_B, peer, (M, R), STD, torch.Generator().manual_seed(5))
    other = regulated_noise(LORA_B, peer, (M, R), STD, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (M, R) and first.dtype == torch.float32
    as_double = regulated_noise(LORA_A, peer.double().T, (R, N_IN), STD, torch.Generator().manual_seed(5))
    assert as_double.shape == (R, N_IN) and as_double.dtype == torch.float64
    half = regulated_noise(LORA_B, peer, (M, R), STD, torch.Generator(), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()
    assert torch.equal(regulated_noise(LORA_B, peer, (M, R), 0.0, torch.Generator()), torch.zeros(M, R))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"trained_factor": HEAD}, "trained_factor"),
        ({"shape": (M, R + 1)}, "shape"),
        ({"std": -1.0}, "std"),
        ({"std": float("nan")}, "std"),
        ({"peer": torch.full((R, N_IN), float("nan"))}, "peer"),
        ({"peer": torch.zeros(R, N_IN, 1, 1)}, "peer"),
    ],
)
def test_regulated_noise_rejects_bad_inputs_naming_them(kwargs, named):
    """A wrong factor, shape, std or a broken peer is refused with a message naming the argument."""
    call = {"trained_factor": LORA_B, "peer": torch.ones(R, N_IN), "shape": (M, R), "std": 1.0}
    call.update(kwargs)
    with pytest.raises(ValueError, match=named):
        regulated_noise(generator=torch.Generator(), **call)
