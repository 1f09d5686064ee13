"""FedSVD (Lee et al., NeurIPS 2025): FFA-LoRA's clients, and a server that re-factorises B A by SVD every round.

Clients train and send only B with A frozen, as in FFA-LoRA, so averaging B is exactly averaging the clients'
updates and the LoRA upload is half of LoRA's. After the aggregation the server replaces (A, B) by the truncated
SVD of the product, `B_bar A = U S V^T`: the new A is `V^T` (orthonormal rows: the principal input directions of the
update so far) and the new B is `U S` (the singular values go into B, as in the paper and its code), so `B A` is
unchanged and the next round's A follows the learned subspace instead of staying at its random init. The server
broadcasts both factors. The step reads only the aggregate, which under DP is already noised: it is
post-processing and costs no privacy (docs/algorithms.md#fedsvd).

Differs from the public code (seanie12/fed-svd), which takes a full SVD of the m x n product: the SVD here is
computed from QR factors of B and A^T and the SVD of an r x r core, O((m + n) r^2) instead of O(m n min(m, n)),
the same factors up to the signs of singular vectors (the code and the paper re-factorise every round, as here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..federation.adapter_state import LORA_A, factor_of, peer_name
from .base import RECIPE_SWEEP, DefaultLearningRate, FederatedMethod
from .ffa_lora import FFALoraConfig, FFALoraMethod


@torch.no_grad()
def svd_refactorize(lora_b: torch.Tensor, lora_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' A' = B A, A' of orthonormal rows (the top right singular vectors of B A) and B' = U S.

    Works on any LoRA layer PEFT builds: A is `r x ...` (a linear or conv `lora_A`, or `lora_embedding_A`), B is
    `m x r` with trailing ones for a conv `lora_B`; both come back in their own shape and dtype.
    """
    rank = lora_a.shape[0]
    a = lora_a.reshape(rank, -1).double()  # r x n
    b = lora_b.reshape(lora_b.shape[0], rank).double()  # m x r
    q_b, r_b = torch.linalg.qr(b)  # m x r, r x r
    q_a, r_a = torch.linalg.qr(a.T)  # n x r, r x r:  A = r_a^T q_a^T
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # B A = q_b (r_b r_a^T) q_a^T = (q_b u) diag(s) (q_a vh^T)^T
    new_a = (q_a @ vh.T).T
    new_b = (q_b @ u) * s
    return new_a.reshape(lora_a.shape).to(lora_a.dtype), new_b.reshape(lora_b.shape).to(lora_b.dtype)


class FedSVDMethod(FFALoraMethod):
    name = "fedsvd"
    display_name = "FedSVD"
    description = (
        "Only B is trained, uploaded and averaged, as in FFA-LoRA; after each round the server re-factorises the "
        "product of the averaged B and the current A by SVD (A: its top right singular vectors, orthonormal rows; "
        "B: the rest) and sends both. The SVD step reads only the aggregate, so under DP it is post-processing "
        "and costs no privacy."
    )
    citation = """@inproceedings{lee2025fedsvd,
  title     = {{FedSVD}: Adaptive Orthogonalization for Private Federated Learning with {LoRA}},
  author    = {Lee, Seanie and Park, Sangwoo and Lee, Dong Bok and Wagner, Dominik and Seong, Haebin and
               Bocklet, Tobias and Lee, Juho and Hwang, Sung Ju},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2025},
  note      = {arXiv:2505.12805}
}"""
    # Its clients are FFA-LoRA's, so it keeps FFA-LoRA's recipe setting (B at a tenth of the head's rate) without
    # a search of its own; only its rate was swept (benchmarks/RESULTS.md#learning-rates).
    recipe_learning_rate = DefaultLearningRate(
        5e-2,
        RECIPE_SWEEP + ", lora_B at 0.1x: 5e-2 (val. acc. 0.692) over 1e-1 (0.672) and 2e-2 (0.662)",
    )
    recipe_settings = FFALoraMethod.recipe_settings

    @torch.no_grad()
    def after_aggregation(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every adapted layer's (A, B) re-factorised from the new global B and the A the clients trained with."""
        updated: dict[str, torch.Tensor] = {}
        for name, lora_a in global_state.items():
            if factor_of(name) != LORA_A:
                continue
            updated[name], updated[peer_name(name)] = svd_refactorize(global_state[peer_name(name)], lora_a)
        return updated

    @torch.no_grad()
    def initialize(self, model: nn.Module) -> None:
        """FFA-LoRA's shared seeded A, after checking that every layer can hold r orthonormal rows."""
        parameters = dict(model.named_parameters())
        for name, lora_a in parameters.items():
            if factor_of(name) != LORA_A:
                continue
            rank, inputs = lora_a.shape[0], lora_a[0].numel()
            outputs = parameters[peer_name(name)].shape[0]
            if rank > min(inputs, outputs):
                raise ValueError(
                    f"FedSVD needs r <= min(in, out) features in every adapted layer: {name} has r={rank} for a "
                    f"{outputs} x {inputs} weight, so B A has no {rank} singular directions. Lower r or leave this "
                    "module out of target_modules."
                )
        super().initialize(model)


@dataclass
class FedSVDConfig(FFALoraConfig):
    """`FedLoraConfig` for FedSVD: lora_B trains (A frozen within a round, as FFA-LoRA); after each round the server
    re-factorises (A, B) by the SVD of B A. `lr_ratio_b` is FFA-LoRA's."""

    method_class: ClassVar[type[FederatedMethod]] = FedSVDMethod
