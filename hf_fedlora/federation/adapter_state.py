"""Adapter state as plain tensors: what a client holds, sends and receives.

One base model lives in memory; clients differ only in these tensors, so a client is
"swapped in" by copying its tensors into the model's parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

LORA_A = "lora_A"
LORA_B = "lora_B"
HEAD = "head"  # a trainable task head (PEFT's modules_to_save), trained and averaged like the factors


def factor_of(parameter_name: str) -> str | None:
    """Which federated factor a parameter belongs to, or None for frozen base weights."""
    if ".lora_A." in parameter_name or ".lora_embedding_A." in parameter_name:
        return LORA_A
    if ".lora_B." in parameter_name or ".lora_embedding_B." in parameter_name:
        return LORA_B
    if ".modules_to_save." in parameter_name:
        return HEAD
    return None


def peer_name(parameter_name: str) -> str:
    """The other LoRA factor of the same layer: lora_A <-> lora_B (the name itself for anything else)."""
    for one, other in ((".lora_A.", ".lora_B."), (".lora_embedding_A.", ".lora_embedding_B.")):
        if one in parameter_name:
            return parameter_name.replace(one, other)
        if other in parameter_name:
            return parameter_name.replace(other, one)
    return parameter_name


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters (LoRA factors and task head), by name, in model order."""
    return {name: p for name, p in model.named_parameters() if factor_of(name) is not None}


def parameters_of(parameters: Mapping[str, nn.Parameter], factors: Iterable[str]) -> dict[str, nn.Parameter]:
    factors = set(factors)
    return {name: p for name, p in parameters.items() if factor_of(name) in factors}


def snapshot(parameters: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters (a payload or the global state)."""
    return {name: p.detach().clone() for name, p in parameters.items()}


@torch.no_grad()
def load_into(parameters: Mapping[str, nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Copy state tensors into the model's parameters in place (no new model, no new tensors)."""
    for name, tensor in state.items():
        parameters[name].copy_(tensor)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """FedAvg: the weighted mean of each tensor; weights are renormalised to sum to one."""
    if not states:
        raise ValueError("weighted_average needs at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {list(weights)}")
    averaged = {}
    for name in states[0]:
        averaged[name] = sum((w / total) * s[name].float() for s, w in zip(states, weights, strict=True)).to(
            states[0][name].dtype
        )
    return averaged


def payload_nbytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes a payload takes on the wire (raw tensor data)."""
    return sum(t.numel() * t.element_size() for t in payload.values())
