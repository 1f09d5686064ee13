"""DEeR's noise regulator: DP noise on a trained LoRA factor, shaped by its frozen peer, never below nominal.

Shapes follow PEFT: A (`lora_A.weight`) is r x n, B (`lora_B.weight`) is m x r, the update is B @ A.
The regulator draws N (m x n, i.i.d. N(0, std^2)) and uses

    xi_B = c * N @ pinv(A)   when B trains (A frozen),
    xi_A = c * pinv(B) @ N   when A trains (B frozen),

so the weight perturbation is xi_B @ A = c * N @ P_row(A) (or B @ xi_A = c * P_col(B) @ N): its shape is
set by the peer's row (column) space alone, not by the spread of the peer's singular values.

Why c = sigma_max(peer), not the paper's c = 1: with the peer's SVD (singular values s_i), every row of
xi_B (every column of xi_A) has covariance c^2 std^2 U diag(1 / s_i^2) U^T. DP-SGD's guarantee is the
Gaussian mechanism's with noise std^2 I on the clipped gradient sum; noise whose covariance is at least
std^2 I in every direction is that mechanism plus independent extra noise (post-processing), so the
accounting stays valid. That needs c / s_i >= 1 for every i, i.e. c >= sigma_max. With c = 1 and
sigma_max > 1 the noise falls below nominal along the top singular direction: the accounted epsilon
would not hold. A consequence worth knowing: with c = sigma_max the regulated noise is at least the
isotropic noise in every direction, so it never makes the weight perturbation smaller than plain DP-SGD.

Directions whose singular value is zero or below pinv's usual relative cutoff (max(shape) * eps of the
peer's dtype, float32's if the peer is coarser) get plain nominal noise: a zero peer (B before its first
sub-round) gives exactly isotropic N(0, std^2) noise, never zero, NaN or inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..federation.adapter_state import LORA_A, LORA_B


def regulated_noise(
    trained_factor: str,
    peer: torch.Tensor,
    shape: Sequence[int],
    std: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noise for the trained factor (`"lora_A"` or `"lora_B"`) of one layer, shaped by the frozen `peer`.

    `shape` is the trained factor's shape ((m, r) for B with peer A of shape (r, n); (r, n) for A with peer B
    of shape (m, r)); `std` is the nominal noise std (noise multiplier x clip norm). Every random draw uses
    `generator`, which must live on the peer's device. Returns a tensor of `shape` on the peer's device, in
    `dtype` (default: the peer's dtype), whose covariance is at least std^2 I in every direction.
    """
    shape = tuple(int(size) for size in shape)
    rank_side = _rank_side_matrix(trained_factor, peer, shape)
    if not (isinstance(std, (int, float)) and math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be a finite number >= 0 (noise multiplier x clip norm), got {std!r}")
    if not torch.isfinite(peer).all():
        raise ValueError("peer holds NaN or inf values: the frozen LoRA factor is broken; no noise can be shaped")

    work_dtype = torch.float32 if peer.device.type == "mps" else torch.float64  # MPS has no float64
    basis, factors = _rank_space_shape(rank_side.detach().to(work_dtype), peer.dtype)
    rank = basis.shape[0]
    if trained_factor == LORA_B:  # rows of xi_B live in the rank space: xi_B ~ Z diag(f) U^T, Z (m x r)
        z = torch.randn((shape[0], rank), generator=generator, dtype=work_dtype, device=peer.device)
        noise = (z * (std * factors)) @ basis.T
    else:  # columns of xi_A live in the rank space: xi_A ~ V diag(f) Z, Z (r x n)
        z = torch.randn((rank, shape[1]), generator=generator, dtype=work_dtype, device=peer.device)
        noise = basis @ (z * (std * factors)[:, None])
    return noise.to(dtype if dtype is not None else peer.dtype)


def _rank_side_matrix(trained_factor: str, peer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The peer as an r x k matrix whose rows index the LoRA rank (A itself, or B transposed); checks shapes."""
    if trained_factor not in (LORA_A, LORA_B):
        raise ValueError(f"trained_factor must be {LORA_A!r} or {LORA_B!r}, got {trained_factor!r}")
    if not isinstance(peer, torch.Tensor) or peer.ndim != 2 or not peer.is_floating_point():
        raise ValueError(
            "peer must be a 2-D floating-point tensor (a linear layer's frozen LoRA factor; convolution "
            f"adapters are not supported by the noise regulator), got {getattr(peer, 'shape', type(peer))}"
        )
    if trained_factor == LORA_B:
        rank, expected = peer.shape[0], "(m, r) with r = peer.shape[0]"
        fits = len(shape) == 2 and shape[1] == rank
    else:
        rank, expected = peer.shape[1], "(r, n) with r = peer.shape[1]"
        fits = len(shape) == 2 and shape[0] == rank
    if not fits:
        raise ValueError(
            f"shape {shape} does not fit the peer {tuple(peer.shape)}: a {trained_factor} noise shape must be "
            f"{expected} = {rank}"
        )
    return peer if trained_factor == LORA_B else peer.T


def _rank_space_shape(rank_side: torch.Tensor, peer_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(orthonormal r x r basis U, per-direction factors f >= 1) from the SVD of the r x k rank-side matrix.

    f_i = sigma_max / s_i where s_i is above pinv's relative cutoff, 1 elsewhere (nominal noise).
    """
    rank, other = rank_side.shape
    basis, singular, _ = torch.linalg.svd(rank_side, full_matrices=other < rank)  # basis is r x r either way
    values = torch.zeros(rank, dtype=rank_side.dtype, device=rank_side.device)
    values[: singular.numel()] = singular
    largest = values.max()
    eps = min(torch.finfo(peer_dtype).eps, torch.finfo(torch.float32).eps)  # bf16/fp16 peers: float32's cutoff
    cutoff = max(rank, other) * eps * largest
    kept = values > cutoff  # all False for a zero peer
    factors = torch.ones_like(values)
    factors[kept] = largest / values[kept]
    # c = sigma_max makes every factor >= 1 in exact arithmetic; the clamp keeps it so under rounding too.
    return basis, factors.clamp(min=1.0)
