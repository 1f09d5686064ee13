"""The privacy objects a run's arguments call for, built the same way by every driver."""

from __future__ import annotations

from typing import Any

from .client_level import ClientLevelPrivacy
from .client_round import ClientLevelRound, ExampleLevelRound, NonPrivateRound
from .engine import FederatedPrivacy
from .scheduled import ScheduledAccounts


def privacy_from_args(args: Any) -> FederatedPrivacy | ClientLevelPrivacy:
    """Unit one example: the per-client DP-SGD engine (also the non-private case, `enabled` False). Unit one client:
    the aggregator's DP-FedAvg."""
    if args.private and args.dp_unit == "client":
        return ClientLevelPrivacy.from_args(args)
    return FederatedPrivacy.from_args(args)


def server_accounts(args: Any) -> ScheduledAccounts | None:
    """The server's own account of each client's spend (example unit only)."""
    if not (args.private and args.dp_unit == "example"):
        return None
    header = FederatedPrivacy.from_args(args).report_header()
    return ScheduledAccounts(
        delta=args.dp_target_delta,
        accountant=args.dp_accountant,
        target_epsilon=args.dp_target_epsilon,
        fixed_noise_multiplier=args.dp_noise_multiplier,
        header=header,
    )


def client_round_privacy(
    args: Any, accelerator: Any, engine: FederatedPrivacy | None, name: str | None, encoder=None, **kwargs
):
    """The object one client's round talks to in this run's privacy mode (see `client_round`); `encoder`: the
    client's distributed-noise encoding under the client unit."""
    if not args.private:
        return NonPrivateRound(args, accelerator, publish_losses=True)
    if args.dp_unit == "client":
        return ClientLevelRound(
            args,
            accelerator,
            clip_norm=args.dp_clip_norm,
            clipping=args.dp_clipping,
            publish_losses=bool(args.publish_unprotected_statistics),
            encoder=encoder,
        )
    return ExampleLevelRound(engine, name, args, accelerator, **kwargs)
