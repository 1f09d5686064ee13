"""The Flower ClientApp: one SuperNode's client, running the in-process trainer's very client round.

Each message starts a fresh ClientApp process (Flower 1.42), so every handler rebuilds what it needs: the task's
model and this node's partition of the data (`--node-config "partition-id=I num-partitions=K"`; optional
`ledger-dir=PATH`), loads the global adapter it receives and runs the round. Under example-level DP the client's
privacy state comes from its ledger on disk (`hf_fedlora.flower.ledger`) and goes back there, atomically, before the
upload is returned. Under client-level DP the client only clips its round update: the noise is the server's.

Messages (the server's `action` in the config record):
- query "discover": who am I (client name, examples, local steps), nothing private;
- query "plan" (example unit): calibrate this client's noise for the run's planned steps, composed with what its
  examples already spent (refused if that would exceed the target);
- train: one (sub-)round from the global adapter; the reply holds the release and the client's privacy report.
- query "secagg" (distributed noise): a stage of the secure sum (`secure_sum`): key setup, key shares, unmasking.
  Its keys live in the node's context state (the SuperNode's memory) between messages, never on disk. A train
  message that carries a secure-sum request takes its keyed shares before training and returns its upload
  encoded (distributed noise: with its noise share; secure aggregation: its weighted update) and masked: the
  server learns only the sum.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..federation.secure_mean import ENCODED, SecureMeanEncoding
from ..privacy.distributed_noise import DistributedNoisePlan
from ..trainer import FederatedTrainer
from .ledger import PrivacyLedger, data_key, default_ledger_dir, example_digests, generator_fingerprint
from .ledger import prior_candidates as ledger_prior_candidates
from .secure_sum import client_mask, client_receive_shares, client_setup, client_share_keys, client_unmask
from .task import load_task, training_args_from_run_config

app = ClientApp()
SECURE_SUM_STATE = "hf_fedlora.secure_sum"  # this node's secure-sum keys, in its context state
SECURE_SUM_RECORD = "secagg"
SECURE_SUM_STAGES = {"setup": client_setup, "share": client_share_keys, "unmask": client_unmask}


class FlowerClient:
    """This node's client: its data, a trainer over them alone, and (under example-level DP) its privacy ledger."""

    def __init__(self, run_config: Mapping[str, Any], node_config: Mapping[str, Any]):
        for key in ("partition-id", "num-partitions"):
            if key not in node_config:
                raise ValueError(
                    f"node config has no {key!r}: start the SuperNode with "
                    '--node-config "partition-id=I num-partitions=K"'
                )
        self.partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
        task = load_task(run_config)
        self.name = f"client_{self.partition_id}"
        self.data = task.load_client_data(self.partition_id, num_partitions)
        output_dir = os.path.join(tempfile.gettempdir(), "hf_fedlora_flower_client")
        # Sampling of clients is the server's; this trainer holds one client.
        args = training_args_from_run_config(run_config, output_dir, num_clients=None, clients_per_round=None)
        self.trainer = FederatedTrainer(
            task.build_model(),
            args,
            train_dataset={self.name: self.data},
            processing_class=task.processing_class,
            data_collator=task.data_collator,
        )
        self.trainer.client_indices[self.name] = self.partition_id  # its streams are the federation's index's
        self.privacy = self.trainer.privacy
        self.example_level = self.trainer._per_example_dp
        self.ledger_dir = node_config.get("ledger-dir") or default_ledger_dir()
        self.data_key = data_key(self.data) if self.example_level else None

    # --- the actions ---------------------------------------------------------------------
    def discover(self) -> dict[str, Any]:
        """Public facts under the example unit (client sizes set q and sigma); under the client unit the server is
        the trusted aggregator and never publishes them. Label counts only when the run publishes unprotected
        statistics (or is not private)."""
        info = {
            "client": self.name,
            "partition-id": self.partition_id,
            "num-examples": len(self.data),
            "local-steps": self.trainer.local_steps_for(len(self.data)),
        }
        if not self.privacy.enabled or self.trainer.args.publish_unprotected_statistics:
            info["label-histogram"] = json.dumps(self.trainer.client_label_histograms.get(self.name, {}))
        return info

    def plan(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Fix this client's noise and step budget for the run, composed with what its examples already spent."""
        plan_id = str(config["plan-id"])
        ledger = PrivacyLedger.open(self.ledger_dir, self.data_key)
        if ledger.plan_id == plan_id and ledger.client is not None:  # planned already (a repeated message)
            self._load(config)
            return self.privacy.plan_reply(self.name)
        if ledger.unit is not None and ledger.unit != self.privacy.unit:
            raise ValueError(
                f"client {self.name!r}: its data already spent privacy under dp_unit={ledger.unit!r}, this run uses "
                f"{self.privacy.unit!r}; the two cannot be composed. Use dp_unit={ledger.unit!r}."
            )
        digests = example_digests(self.data)
        candidates, seeded = ledger_prior_candidates(self.ledger_dir, digests)
        if candidates:
            self.privacy.set_prior_candidates(self.name, candidates)
        self.privacy.plan(
            {self.name: len(self.data)},
            self.trainer.logical_batch_size,  # the expected Poisson batch: q = logical / n
            {self.name: int(config["planned-steps"])},
            self.trainer.args.device,
            client_indices={self.name: self.partition_id},
            total_examples=int(config["total-examples"]),
        )
        client = self.privacy.clients[self.name]
        if ledger.client is not None:  # continue these data's secret streams: never re-derive (replay) them
            saved = self.privacy.client_from_state(ledger.client, self.trainer.args.device)
            client.noise_generator.set_state(saved.noise_generator.get_state())
            client.sampling_generator.set_state(saved.sampling_generator.get_state())
            ledger.past_own = ledger.own  # the earlier plan's steps stay these data's, once
        ledger.unit, ledger.plan_id, ledger.digests = self.privacy.unit, plan_id, digests
        ledger.seeded = ledger.seeded or seeded or self.privacy.seeded
        self._save(ledger)
        return self.privacy.plan_reply(self.name)

    def train(
        self, global_state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor] | None, list[float], dict[str, Any] | None]:
        """One (sub-)round: (release or None, losses (empty under DP), privacy report). The ledger is on disk before
        this returns, i.e. before anything leaves the client."""
        round_index, sub_round = int(config["round"]), int(config["sub-round"])
        self.trainer.load_global_state(global_state)
        if not self.example_level:
            upload, losses = self.trainer.local_round(self.name, round_index, sub_round, int(config["steps"]))
            return upload, losses, None
        ledger = self._load(config)
        noise_state = generator_fingerprint(self.privacy.clients[self.name].noise_generator.get_state())
        try:
            upload, losses = self.trainer.local_round(self.name, round_index, sub_round, int(config["steps"]))
        finally:  # a step that ran (or failed half-way) is spent: on disk whatever happens
            ledger.releases.append(
                {"plan_id": ledger.plan_id, "round": round_index, "sub_round": sub_round, "noise_state": noise_state}
            )
            self._save(ledger)
        return upload, losses, self._report(ledger)

    # --- the ledger ----------------------------------------------------------------------
    def _load(self, config: Mapping[str, Any]) -> PrivacyLedger:
        ledger = PrivacyLedger.open(self.ledger_dir, self.data_key)
        if ledger.plan_id != str(config["plan-id"]) or ledger.client is None:
            raise RuntimeError(
                f"client {self.name!r} has no privacy plan for this run in its ledger {ledger.path}: it refuses to "
                "train (a missing ledger would reset its budget and replay its noise). Restore the ledger "
                "directory, or start a new run so the client is planned again."
            )
        self.privacy.load_client_state(self.name, ledger.client, self.trainer.args.device)
        self.privacy.seeded = ledger.seeded
        return ledger

    def _save(self, ledger: PrivacyLedger) -> None:
        ledger.client = self.privacy.client_state(self.name)
        ledger.spent = [list(entry) for entry in self.privacy.history(self.name)]
        ledger.save()

    def _report(self, ledger: PrivacyLedger) -> dict[str, Any]:
        self.privacy.seeded = ledger.seeded
        return self.privacy.report_header() | {"client": self.privacy.client_report(self.name)}


def _reply(msg: Message, content: dict[str, Any], upload: Mapping[str, torch.Tensor] | None = None) -> Message:
    records: dict[str, Any] = {"info": ConfigRecord({"json": json.dumps(content)})}
    if upload is not None:
        records["upload"] = ArrayRecord(dict(upload))
    return Message(RecordDict(records), reply_to=msg)


def _config(msg: Message) -> dict[str, Any]:
    return dict(msg.content["config"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    config = _config(msg)
    client = FlowerClient(context.run_config, context.node_config)
    action = config.get("action")
    if action == "discover":
        return _reply(msg, client.discover())
    if action == "plan":
        return _reply(msg, {"plan": client.plan(config)})
    raise ValueError(f"unknown query action {action!r}; expected discover or plan")


@app.query("secagg")
def secure_sum_stage(msg: Message, context: Context) -> Message:
    """A key stage of the secure sum: no model, no data."""
    request = _config(msg)
    stage = request.pop("stage")
    if stage not in SECURE_SUM_STAGES:
        raise ValueError(f"unknown secure-sum stage {stage!r}; expected one of {sorted(SECURE_SUM_STAGES)}")
    state = _secure_sum_state(context)
    reply = SECURE_SUM_STAGES[stage](request, state)
    context.state[SECURE_SUM_STATE] = ConfigRecord(state)
    return Message(RecordDict({SECURE_SUM_RECORD: ConfigRecord(dict(reply))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config(msg)
    client = FlowerClient(context.run_config, context.node_config)
    state = msg.content["global"].to_torch_state_dict()
    if SECURE_SUM_RECORD not in msg.content:
        upload, losses, report = client.train(state, config)
        return _reply(msg, {"client": client.name, "losses": losses, "privacy": report}, upload)
    # A secure sum: the shares of the others' keys first (refused if the session does not match), then the round,
    # its upload encoded (with this client's noise share, or as its weighted update), then masked.
    secure = _secure_sum_state(context)
    client_receive_shares(dict(msg.content[SECURE_SUM_RECORD]), secure)
    if "noise-plan" in config:  # distributed noise: the trainer encodes the clipped update with its noise share
        client.trainer.privacy.distributed = DistributedNoisePlan.from_dict(json.loads(config["noise-plan"]))
    upload, losses, report = client.train(state, config)
    if "secure-mean" in config and upload is not None:  # secure aggregation of the weighted mean
        encoding = SecureMeanEncoding.from_dict(json.loads(config["secure-mean"]))
        upload = encoding.encode(client.name, client.partition_id, upload, state)
    if upload is None or set(upload) != {ENCODED}:
        raise RuntimeError(f"client {client.name!r} has no encoded upload for the secure sum")
    masked = client_mask(upload[ENCODED].numpy(), secure)
    context.state[SECURE_SUM_STATE] = ConfigRecord(secure)
    return _reply(
        msg, {"client": client.name, "losses": losses, "privacy": report}, {"masked": torch.from_numpy(masked)}
    )


def _secure_sum_state(context: Context) -> dict[str, Any]:
    record = context.state.config_records.get(SECURE_SUM_STATE) if SECURE_SUM_STATE in context.state else None
    return dict(record) if record is not None else {}
