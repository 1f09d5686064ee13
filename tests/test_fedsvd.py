"""FedSVD (hf_fedlora/methods/fedsvd.py): FFA-LoRA's clients plus a server step that re-factorises B A by SVD.

docs/algorithms.md#fedsvd states what is checked here: after every server step B A equals the aggregated product
and A has orthonormal rows; clients send only B and the head; the SVD step costs no privacy (the epsilon is
FFA-LoRA's for the same schedule, and an independent accountant agrees); the adapter loads in plain peft.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from test_deer_rolora import independent_rdp_epsilon
from test_privacy_truth import logits_of
from tiny import fed_args, tiny_bert, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FedSVDConfig, FFALoraConfig
from hf_fedlora.federation.adapter_state import HEAD, LORA_A, LORA_B, factor_of, peer_name
from hf_fedlora.hub import CARD_NAME
from hf_fedlora.methods.fedsvd import svd_refactorize
from hf_fedlora.verify import verify_adapter

SIZES = [10, 20, 30]  # unequal clients: a wrong weighting would show


def assert_orthonormal_rows(a: torch.Tensor) -> None:
    rows = a.reshape(a.shape[0], -1).double()
    torch.testing.assert_close(rows @ rows.T, torch.eye(a.shape[0], dtype=torch.float64), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------
# 1. The re-factorisation on its own
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("b_shape", "a_shape"),
    [((6, 3), (3, 5)), ((40, 4), (4, 7)), ((5, 2, 1, 1), (2, 3, 3, 3))],  # linear, tall, conv
    ids=["linear", "tall", "conv"],
)
def test_refactorize_keeps_the_product_and_gives_A_orthonormal_rows(b_shape, a_shape):
    generator = torch.Generator().manual_seed(0)
    b, a = torch.randn(b_shape, generator=generator), torch.randn(a_shape, generator=generator)
    new_a, new_b = svd_refactorize(b, a)
    assert new_a.shape == a.shape and new_b.shape == b.shape and new_a.dtype == a.dtype
    rank = a.shape[0]
    product = b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)
    new_product = new_b.reshape(b.shape[0], rank) @ new_a.reshape(rank, -1)
    torch.testing.assert_close(new_product, product, rtol=1e-5, atol=1e-5)
    assert_orthonormal_rows(new_a)
    # the singular values went into B: its columns are orthogonal with norms the product's singular values
    columns = new_b.reshape(b.shape[0], rank).double()
    gram = columns.T @ columns
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-4)
    singular = torch.linalg.svdvals(product.double())[:rank]
    torch.testing.assert_close(torch.diagonal(gram).sqrt(), singular, rtol=1e-5, atol=1e-5)


def test_refactorize_of_a_zero_B_keeps_B_zero():
    """Before any update B is zero: the product stays zero and A still gets orthonormal rows (no NaN)."""
    a = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    new_a, new_b = svd_refactorize(torch.zeros(6, 3), a)
    assert torch.equal(new_b, torch.zeros(6, 3))
    assert_orthonormal_rows(new_a)


# --------------------------------------------------------------------------------------
# 2. In a federated run: every server step
# --------------------------------------------------------------------------------------
class RecordingTrainer(FederatedTrainer):
    """Records each client's upload and the A it trained with, and the global state around every server step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.client_records: list[dict] = []
        self.server_steps: list[dict] = []
        step = self.method.after_aggregation

        def recording_step(global_state):
            before = {name: tensor.clone() for name, tensor in global_state.items()}
            result = step(global_state)
            self.server_steps.append({"before": before, "result": {k: v.clone() for k, v in result.items()}})
            return result

        self.method.after_aggregation = recording_step

    def local_round(self, name, round_index, sub_round, steps):
        upload, losses = super().local_round(name, round_index, sub_round, steps)
        lora_a = {n: p.detach().clone() for n, p in self.model.named_parameters() if factor_of(n) == LORA_A}
        self.client_records.append({"round": round_index, "upload": upload, "lora_A": lora_a})
        return upload, losses


def run_recorded(tmp_path, rounds=3, **overrides) -> RecordingTrainer:
    data = toy_dataset(n=sum(SIZES))
    clients, start = [], 0
    for size in SIZES:
        clients.append(data.select(range(start, start + size)))
        start += size
    settings = dict(num_rounds=rounds, num_clients=len(SIZES), local_steps=2, learning_rate=5e-2)
    args = fed_args(tmp_path, **{**settings, **overrides})
    trainer = RecordingTrainer(model=tiny_peft(FedSVDConfig), args=args, train_dataset=clients)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "privacy",
    [{}, {"dp_noise_multiplier": 1.0}, {"dp_unit": "client", "dp_noise_multiplier": 0.5, "dp_clip_norm": 1.0}],
    ids=["non_private", "dp_example", "dp_client"],
)
def test_every_server_step_keeps_the_aggregated_product_and_orthonormalises_A(tmp_path, privacy):
    trainer = run_recorded(tmp_path, **privacy)
    rounds = trainer.args.num_rounds
    assert len(trainer.server_steps) == rounds
    initial_a = trainer.client_records[0]["lora_A"]
    layers = [(a_name, peer_name(a_name)) for a_name in initial_a]
    assert len(layers) == 4  # query and value in 2 layers

    for round_index, step in enumerate(trainer.server_steps):
        records = [r for r in trainer.client_records if r["round"] == round_index]
        before, result = step["before"], step["result"]
        assert set(result) == {name for layer in layers for name in layer}  # both factors of every layer
        for a_name, b_name in layers:
            # the clients trained with the A the server held (FFA-LoRA within a round): before[a_name]
            assert all(torch.equal(r["lora_A"][a_name], before[a_name]) for r in records)
            aggregated = before[b_name] @ before[a_name]
            assert aggregated.abs().max() > 0  # B moved: the check is not 0 == 0
            torch.testing.assert_close(result[b_name] @ result[a_name], aggregated, rtol=1e-5, atol=1e-6)
            assert_orthonormal_rows(result[a_name])
        if not privacy:  # the aggregate itself is FedAvg of the uploaded B (under client-level DP it is noised)
            weights = torch.tensor(SIZES, dtype=torch.float64) / sum(SIZES)
            for _, b_name in layers:
                mean = sum(w * r["upload"][b_name].double() for w, r in zip(weights, records, strict=True))
                torch.testing.assert_close(before[b_name].double(), mean, rtol=1e-5, atol=1e-7)
        # the next round's clients start from the re-factorised A
        following = [r for r in trainer.client_records if r["round"] == round_index + 1]
        for record in following:
            assert all(torch.equal(record["lora_A"][a], result[a]) for a, _ in layers)

    # the uploads carry B and the head only: half of LoRA's LoRA part
    for record in trainer.client_records:
        if record["upload"] is not None:
            assert {factor_of(name) for name in record["upload"]} == {LORA_B, HEAD}
    # the global adapter holds the last step's factors, and A left its seeded init
    final = dict(trainer.model.named_parameters())
    for a_name, b_name in layers:
        assert torch.equal(final[a_name].detach(), trainer.server_steps[-1]["result"][a_name])
        assert torch.equal(final[b_name].detach(), trainer.server_steps[-1]["result"][b_name])
        assert not torch.allclose(final[a_name].detach(), initial_a[a_name])


# --------------------------------------------------------------------------------------
# 3. No privacy cost
# --------------------------------------------------------------------------------------
def test_the_svd_step_costs_no_privacy(tmp_path):
    """Calibrated to a target, FedSVD's clients get FFA-LoRA's noise and epsilon for the same schedule, an
    independent accountant gives the same epsilon from (sigma, q, steps), and `hf-fedlora verify` accepts the
    saved FedSVD adapter."""
    reports = {}
    for config_cls in (FedSVDConfig, FFALoraConfig):
        args = fed_args(tmp_path / config_cls.__name__, num_rounds=3, local_steps=2, dp_target_epsilon=4.0)
        trainer = FederatedTrainer(tiny_peft(config_cls), args, train_dataset=toy_dataset(120))
        trainer.train()
        trainer.save_model()
        reports[config_cls] = trainer.privacy_report()
    report = verify_adapter(tmp_path / FedSVDConfig.__name__)
    assert report.ok and report.private, report.problems
    fedsvd, ffa = reports[FedSVDConfig], reports[FFALoraConfig]
    assert fedsvd["epsilon"] == ffa["epsilon"] and fedsvd["epsilon"] <= 4.0
    for name, client in fedsvd["clients"].items():
        assert client["noise_multiplier"] == ffa["clients"][name]["noise_multiplier"]
        assert client["steps"] == 3 * 2
        independent = independent_rdp_epsilon(
            client["noise_multiplier"], client["sample_rate"], client["steps"], fedsvd["delta"]
        )
        assert client["epsilon"] == pytest.approx(independent, rel=5e-3)  # fractional-order RDP differs ~0.1%


# --------------------------------------------------------------------------------------
# 4. Plain peft, and continuing a trained adapter
# --------------------------------------------------------------------------------------
def test_the_card_cites_it_the_adapter_loads_in_plain_peft_and_a_new_trainer_keeps_its_A(tmp_path):
    data = toy_dataset(120)
    trainer = FederatedTrainer(
        tiny_peft(FedSVDConfig), fed_args(tmp_path / "run", learning_rate=5e-2), train_dataset=data
    )
    trainer.train()
    trainer.save_model()
    trained = logits_of(trainer.model, data)
    card = (tmp_path / "run" / CARD_NAME).read_text()
    assert "FedSVD" in card and "@inproceedings{lee2025fedsvd" in card
    assert "so under DP it is post-processing and costs no privacy" in card

    plain = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "run"))
    torch.testing.assert_close(logits_of(plain, data), trained, rtol=0, atol=1e-6)

    # continuing: the saved A (no longer the seeded init) is kept, not redrawn from init_seed
    config = FedSVDConfig.from_pretrained(str(tmp_path / "run"))
    assert isinstance(config, FedSVDConfig)
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "run"), config=config, is_trainable=True)
    FederatedTrainer(loaded, fed_args(tmp_path / "run2"), train_dataset=data)
    torch.testing.assert_close(logits_of(loaded, data), trained, rtol=0, atol=1e-6)


def test_a_rank_above_a_layers_width_is_refused_before_training(tmp_path):
    """r orthonormal rows need r <= min(in, out): the tiny BERT's 16-wide query cannot hold r=32."""
    with pytest.raises(ValueError, match=r"FedSVD needs r <= min\(in, out\).*r=32 for a 16 x 16 weight"):
        FederatedTrainer(tiny_peft(FedSVDConfig, r=32), fed_args(tmp_path), train_dataset=toy_dataset(40))
