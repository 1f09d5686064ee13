"""Post-noise filters: functions of the already-noised gradient only, so they cost no privacy.

A method names its filter (`FederatedMethod.noisy_gradient_filter`); the DP optimizer looks it up
here and applies it after the noise, never before (before the noise it would change what is
clipped and the sensitivity analysis would no longer hold).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..federation.adapter_state import LORA_A, LORA_B

BINOMIAL_KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)  # divided by 16: the binomial smoother B(4)
_HALF_WIDTH = len(BINOMIAL_KERNEL) // 2


def _symmetric_indices(length: int, pad: int, device: torch.device) -> Tensor:
    """Indices of numpy's "symmetric" padding (edge repeated: x1, x0 | x0 .. x[-1] | x[-1], x[-2]).

    Folding the positions with period 2 * length also covers signals shorter than the padding
    (length 1 gives x0 everywhere, length 2 gives x1, x0 | x0, x1 | x1, x0), exactly as numpy does.
    """
    positions = torch.arange(-pad, length + pad, device=device) % (2 * length)
    return torch.where(positions < length, positions, 2 * length - 1 - positions)


def _smooth_rows(rows: Tensor) -> Tensor:
    """Binomial low-pass of each row of a 2-D tensor along its last axis; rows never mix."""
    length = rows.shape[-1]
    padded = rows.index_select(-1, _symmetric_indices(length, _HALF_WIDTH, rows.device))
    kernel = torch.tensor(BINOMIAL_KERNEL, dtype=rows.dtype, device=rows.device).div_(16.0).view(1, 1, -1)
    return F.conv1d(padded.unsqueeze(1), kernel).squeeze(1)  # (rows, 1, length + 4) -> (rows, length)


def binomial_lowpass(gradient: Tensor, factor: str) -> Tensor:
    """LA-LoRA's fixed low-pass filter [1, 4, 6, 4, 1] / 16 along a LoRA factor's feature axis.

    lora_A (r x n) is smoothed along n within each row, lora_B (m x r) along m within each column:
    never across rank components. Anything else (the task head) is returned unchanged.
    Padding is numpy's "symmetric" (edge value repeated) rather than "reflect" (edge not repeated):
    it is the symmetric padding docs/algorithms.md#la-lora-low-pass-filter specifies, it keeps a
    constant gradient constant up to the edges (no zero-padding dip), and it is defined for every length,
    even 1 or 2 features, where "reflect" with a pad of 2 is not.
    """
    if factor not in (LORA_A, LORA_B):
        return gradient
    if gradient.dim() != 2:
        raise ValueError(
            f"binomial_lowpass filters 2-D LoRA factors (linear or embedding layers); got a {factor} gradient of "
            f"shape {tuple(gradient.shape)}. Target only linear/embedding modules, or set lowpass_filter=False."
        )
    if factor == LORA_A:  # (r, n): each row is one rank component's signal over the input features
        return _smooth_rows(gradient)
    return _smooth_rows(gradient.transpose(0, 1)).transpose(0, 1).contiguous()  # (m, r): smooth each column


NOISY_GRADIENT_FILTERS: dict[str, Callable[[Tensor, str], Tensor]] = {"binomial_lowpass": binomial_lowpass}
