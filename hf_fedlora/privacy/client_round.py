"""One client's round, as each privacy mode runs it: the object the client round talks to, so it reads the same in
every mode (as Opacus's `make_private` hands back wrapped pieces).

- `NonPrivateRound`: shuffled batches, the plain optimizer, Trainer's `max_grad_norm`, fp16 with a GradScaler of this
  client-round's own; the release is the trained tensors.
- `ExampleLevelRound` (unit one example): Poisson batches from the client's secret stream, each step accounted before
  it runs, per-example losses and gradients, clipping and noise in the DP optimizer; an empty batch still takes a
  (pure-noise) step; under fp16 a fixed, public loss scale.
- `ClientLevelRound` (unit one client, DP-FedAvg): trains as `NonPrivateRound`; the release is the round's update
  (trained minus start), clipped to C. The noise is the aggregator's (`ClientLevelPrivacy`), or under distributed
  noise the client's own share, added as it encodes the update for the secure sum.

Under DP nothing computed without noise leaves the client: losses stay unless the run publishes them on request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .client_level import clip_update
from .opacus_compat import give_empty_batch
from .per_example_loss import summed_example_losses


class NonPrivateRound:
    per_example = False

    def __init__(self, args: Any, accelerator: Any, *, publish_losses: bool = True):
        self.args = args
        self.accelerator = accelerator
        self.publish_losses = publish_losses
        # fp16: a scaler of this client-round's own, so its adapted scale depends on no other client's data.
        self.scaler = torch.amp.GradScaler(args.device.type) if args.fp16 else None
        self._order: list[int] | None = None

    def optimizer(self, optimizer: torch.optim.Optimizer, **_: Any) -> torch.optim.Optimizer:
        return optimizer

    def can_step(self) -> bool:
        return True

    def next_batch(self, step: int, num_examples: int, batch_size: int, shuffle: torch.Generator) -> list[int]:
        """Consecutive slices of one shuffled order, wrapping around."""
        if self._order is None:
            self._order = torch.randperm(num_examples, generator=shuffle).tolist()
        start = (step * batch_size) % num_examples
        batch = self._order[start : start + batch_size]
        return batch + self._order[: batch_size - len(batch)] if len(batch) < batch_size else batch

    def loss(self, model, inputs, batch_size: int, causal_lm: bool, compute_loss: Callable) -> tuple[Any, float]:
        loss = compute_loss(model, inputs)
        return loss, float(loss.detach())

    def backward(self, loss: torch.Tensor, weight: float, batch_size: int, per_example_gradients: Any) -> None:
        """The micro-batch's mean loss, weighted so micro-batches add up to the logical batch's mean."""
        loss = loss * weight
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            self.accelerator.backward(loss)

    def after_micro_batch(self, optimizer: torch.optim.Optimizer, last: bool) -> None:
        return None

    def finish_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter]) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, as Trainer does
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(parameters, self.args.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped if a gradient overflowed; the scale then shrinks
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def empty_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter]) -> None:
        return None  # non-private batches are never empty

    def close(self) -> None:
        return None

    def release(self, start: Mapping[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return trained

    def published_losses(self, losses: list[float]) -> list[float]:
        return losses if self.publish_losses else []


class ClientLevelRound(NonPrivateRound):
    """DP-FedAvg's client: local training as usual; what leaves is the update clipped to C."""

    def __init__(
        self,
        args: Any,
        accelerator: Any,
        *,
        clip_norm: float,
        clipping: str,
        publish_losses: bool,
        encoder: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        super().__init__(args, accelerator, publish_losses=publish_losses)
        self.clip_norm = clip_norm
        self.clipping = clipping
        self.encoder = encoder  # distributed noise: the clipped update leaves encoded, with this client's noise share

    def release(self, start: Mapping[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        update = {key: trained[key].float() - start[key].float() for key in trained}
        clipped = clip_update(update, self.clip_norm, self.clipping)
        return self.encoder(clipped) if self.encoder is not None else clipped


class ExampleLevelRound:
    """DP-SGD on one client's shard for one round, through the example-level engine (`FederatedPrivacy`)."""

    per_example = True

    def __init__(self, engine: Any, name: str, args: Any, accelerator: Any, *, loss_scale: float, on_close: Callable):
        self.engine = engine
        self.name = name
        self.args = args
        self.accelerator = accelerator
        self.loss_scale = loss_scale  # fp16: the fixed, public factor on the loss, divided out per example
        self._on_close = on_close  # persists the secret state before anything computed from it leaves

    def optimizer(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> torch.optim.Optimizer:
        return self.engine.private_optimizer(optimizer, self.name, loss_scale=self.loss_scale, **kwargs)

    def can_step(self) -> bool:
        return self.engine.can_step(self.name)

    def next_batch(self, step: int, num_examples: int, batch_size: int, shuffle: torch.Generator) -> list[int]:
        """A Poisson batch from the client's secret stream (never the published seed); the step is accounted here,
        before it runs: a step that fails half-way is still spent."""
        batch = self.engine.sample_batch(self.name)
        self.engine.record_step(self.name)
        return batch

    def loss(self, model, inputs, batch_size: int, causal_lm: bool, compute_loss: Callable) -> tuple[Any, float]:
        """The sum of each example's own loss, so each recorded gradient depends on its example alone."""
        loss, example_losses = summed_example_losses(model, inputs, batch_size, causal_lm)
        return loss, float(example_losses.float().mean())

    def backward(self, loss: torch.Tensor, weight: float, batch_size: int, per_example_gradients: Any) -> None:
        if self.args.fp16:
            (loss * self.loss_scale).backward()
        else:
            self.accelerator.backward(loss)
        per_example_gradients.fold_to_batch(batch_size)  # e.g. Swin's windows back to their examples

    def after_micro_batch(self, optimizer: torch.optim.Optimizer, last: bool) -> None:
        """Clip and sum this micro-batch now; the noise and the step come after the logical batch's last."""
        optimizer.signal_skip_step(do_skip=not last)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # frees this micro-batch's per-example gradients only

    def finish_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter]) -> None:
        return None

    def empty_step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.nn.Parameter]) -> None:
        give_empty_batch(list(parameters))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._on_close()

    def release(self, start: Mapping[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return trained

    def published_losses(self, losses: list[float]) -> list[float]:
        return losses if self.args.publish_unprotected_statistics else []
