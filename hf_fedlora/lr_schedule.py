"""Trainer's learning-rate schedule (`lr_scheduler_type`, warmup) run over a whole federated run.

Every client-round starts a fresh optimizer, so a torch scheduler cannot carry over; instead the rate at local step
s of (sub-)round j of round r follows the schedule at step (r x J + j) x S + s of num_rounds x J x S (J sub-rounds
of S local steps). Clients in one round all train at the same rates, and the last round trains at the schedule's
end. The schedule depends on arguments only, never on data, so it costs no privacy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import SchedulerType, TrainingArguments, get_scheduler

# Schedules that need a metric (a validation loss the clients do not have) cannot run from arguments alone.
UNSUPPORTED = (SchedulerType.REDUCE_ON_PLATEAU,)


def learning_rate_factor(args: TrainingArguments, total_steps: int) -> Callable[[int], float]:
    """The multiplier of `learning_rate` at each step of a run of `total_steps` steps, as Trainer computes it.

    `args` were checked once, when FederatedTrainingArguments was built (`check_schedule`)."""
    unused = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        unused,
        num_warmup_steps=args.get_warmup_steps(total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )
    return scheduler.lr_lambdas[0]


def check_schedule(args: TrainingArguments) -> None:
    if SchedulerType(args.lr_scheduler_type) in UNSUPPORTED:
        raise ValueError(
            f"lr_scheduler_type={SchedulerType(args.lr_scheduler_type).value!r} is not supported by federated "
            "training: it steps on a validation metric the clients do not have. Use a schedule over steps "
            "(constant, linear, cosine, ...)."
        )
