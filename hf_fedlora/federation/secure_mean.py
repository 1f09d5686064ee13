"""The weighted mean of the clients' uploads through a secure sum: the server learns the mean and nothing of any one
upload.

FedAvg of what the clients upload, sum_k w_k u_k / sum_k w_k, is the global tensor plus the weighted mean of the
updates u_k - g. A secure sum adds integers modulo 2^bits, so each client sends

- its update, every coordinate clipped to [-c, c] (`secure_aggregation_range`, public), times its public weight
  w_k / W (W: the weights of the sub-round's planned clients, so the sum stays within [-c, c]), divided by the
  grid step gamma and rounded at random to a neighbouring integer (unbiased);
- one more number: its weight w_k / W in units of 2^-(bits - 2), so the sum also carries the weight of the clients
  that took part, and the mean over the clients that finished needs no list of who they were.

gamma is sized so that the sum of every planned client fits in the modulus (one unit of rounding each). The server
maps the sum to signed integers, multiplies by gamma, and divides by the summed weight. The result equals FedAvg of
the uploads within n gamma / (sum of weights) per coordinate, when no coordinate of an update was clipped; a
clipped coordinate moves the mean by what was cut, times the client's share (the record counts nothing: the
server cannot see it; choose c above the largest update a round can make).

Under DP (example unit) the uploads are already noised by each client, so this only hides them; rounding is
post-processing and draws from a stream derived from the run's public seed, so a Flower run and an in-process run
encode the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

ENCODED = "secure_sum.encoded"  # the one tensor a client uploads under a secure sum
SUMMED, SHARES = "secure_sum.total", "secure_sum.shares"  # a secure sum's result: the modular sum, how many added
ROUNDING_STREAM = 6


@dataclass(frozen=True)
class SecureMeanEncoding:
    """One (sub-)round's public encoding: what every client and the server need, and nothing secret."""

    bits: int
    clip_range: float  # c
    total_weight: float  # W: the planned clients' weights
    clients: int  # n: the planned clients
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[str, float], ...]  # each planned client's public weight (its examples, or 1)
    public_seed: int
    round_index: int
    sub_round: int

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes) + 1  # + the weight slot

    @property
    def modulus(self) -> int:
        return 2**self.bits

    @property
    def granularity(self) -> float:
        """gamma: the sum of every client's weighted, clipped update lies in [-c, c]; plus one unit of rounding per
        client, it fits in [-2^(bits-1), 2^(bits-1))."""
        room = 2 ** (self.bits - 1) - 2 * self.clients - 2
        if room <= 0:
            raise ValueError(f"secure_sum_bits={self.bits} is too few for {self.clients} clients")
        return self.clip_range / room

    @property
    def weight_unit(self) -> float:
        return 2.0 ** (self.bits - 2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SecureMeanEncoding:
        values = dict(values)
        values["keys"] = tuple(values["keys"])
        values["shapes"] = tuple(tuple(int(n) for n in shape) for shape in values["shapes"])
        values["weights"] = tuple((str(name), float(weight)) for name, weight in values["weights"])
        return cls(**values)

    @classmethod
    def plan(
        cls, global_state: Mapping[str, torch.Tensor], keys: Sequence[str], weights: Mapping[str, float], **kwargs
    ):
        """The encoding of a sub-round whose planned clients have these public weights."""
        keys = tuple(sorted(keys))
        return cls(
            keys=keys,
            shapes=tuple(tuple(global_state[key].shape) for key in keys),
            weights=tuple((name, float(weight)) for name, weight in weights.items()),
            total_weight=float(sum(weights.values())),
            clients=len(weights),
            **kwargs,
        )

    def weight_of(self, name: str) -> float:
        return dict(self.weights)[name]

    # --- a client ----------------------------------------------------------------------------------------------
    def encode(
        self, name: str, index: int, upload: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One client's upload as residues modulo 2^bits (int64): its weighted, clipped update on the grid, and
        its weight."""
        if set(upload) != set(self.keys):
            raise ValueError(f"the upload's tensors {sorted(upload)} are not this sub-round's {list(self.keys)}")
        update = torch.cat(
            [(upload[key].double().cpu() - global_state[key].double().cpu()).reshape(-1) for key in self.keys]
        )
        share = self.weight_of(name) / self.total_weight
        scaled = update.clamp(-self.clip_range, self.clip_range) * share / self.granularity
        generator = torch.Generator().manual_seed(self._rounding_seed(index))
        floor = torch.floor(scaled)
        rounded = floor + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < scaled - floor)
        weight_slot = torch.tensor([round(share * self.weight_unit)], dtype=torch.float64)
        encoded = torch.cat([rounded, weight_slot]).to(torch.int64)
        return {ENCODED: torch.remainder(encoded, self.modulus)}

    def _rounding_seed(self, index: int) -> int:
        sequence = np.random.SeedSequence([self.public_seed, index, self.round_index, self.sub_round, ROUNDING_STREAM])
        return int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)

    # --- the server --------------------------------------------------------------------------------------------
    def decode(self, total: torch.Tensor, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weighted mean of the uploads of the clients whose encodings are in `total`."""
        signed = torch.remainder(total.to(torch.int64) + self.modulus // 2, self.modulus) - self.modulus // 2
        weight = float(signed[-1]) / self.weight_unit
        if weight <= 0:
            raise ValueError("the secure sum carries no client's weight")
        mean_update = signed[:-1].double() * self.granularity / weight
        out, start = {}, 0
        for key, shape in zip(self.keys, self.shapes, strict=True):
            count = math.prod(shape)
            reference = global_state[key]
            step = mean_update[start : start + count].reshape(shape).to(reference.device)
            out[key] = (reference.double() + step).to(reference.dtype)
            start += count
        return out


class ModularSum:
    """The sum modulo 2^bits of encoded uploads: each one on its own (the secure sum simulated in process) or a
    secure sum's result ({SUMMED, SHARES}); `count` says how many uploads it holds."""

    def __init__(self, size: int, bits: int):
        self.size, self.modulus, self.bits = size, 2**bits, bits
        self.count = 0
        self.total = torch.zeros(size, dtype=torch.int64)

    @torch.no_grad()
    def add(self, upload: Mapping[str, torch.Tensor]) -> None:
        if set(upload) == {SUMMED, SHARES}:
            encoded, count = upload[SUMMED], int(upload[SHARES])
        elif set(upload) == {ENCODED}:
            encoded, count = upload[ENCODED], 1
        else:
            raise ValueError(
                f"under a secure sum an upload is one encoded tensor {ENCODED!r}; got {sorted(upload)[:3]}"
            )
        if encoded.shape != (self.size,) or encoded.dtype != torch.int64:
            raise ValueError(f"an encoded upload must be one int64 tensor of {self.size} numbers")
        if bool((encoded < 0).any() or (encoded >= self.modulus).any()):
            raise ValueError(f"an encoded upload holds numbers outside [0, 2^{self.bits})")
        self.total = torch.remainder(self.total + encoded, self.modulus)
        self.count += count


class SecureMeanSum:
    """The server's side of one sub-round under secure aggregation: the modular sum, decoded to the weighted mean."""

    def __init__(self, encoding: SecureMeanEncoding):
        self.encoding = encoding
        self.sum = ModularSum(encoding.size, encoding.bits)

    @property
    def count(self) -> int:
        return self.sum.count

    def add(self, upload: Mapping[str, torch.Tensor]) -> None:
        self.sum.add(upload)

    def release(self, global_state: Mapping[str, torch.Tensor], regulate: bool = False) -> dict[str, torch.Tensor]:
        return self.encoding.decode(self.sum.total, global_state)
