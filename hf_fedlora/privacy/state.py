"""Small shared pieces of privacy state: accountant histories, and generator states as JSON-safe text."""

from __future__ import annotations

import base64
from collections.abc import Iterable

import torch

History = list[tuple[float, float, int]]


def merged_history(history: Iterable[Iterable[float]]) -> History:
    """(noise multiplier, sample rate, steps) entries, consecutive ones with the same (sigma, q) merged into one, as
    Opacus's accountants keep them; entries with no steps dropped. Two histories that merge equal spend alike."""
    merged: History = []
    for sigma, rate, steps in history:
        if not int(steps):
            continue
        if merged and merged[-1][0] == float(sigma) and merged[-1][1] == float(rate):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged


def steps_of(history: Iterable[Iterable[float]]) -> int:
    """How many steps (or rounds) a history spent."""
    return sum(int(steps) for _, _, steps in history)


def encode_generator_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().cpu().numpy().tobytes()).decode("ascii")


def decode_generator_state(generator: torch.Generator, text: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
