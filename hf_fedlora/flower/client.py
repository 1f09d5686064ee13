"""The Flower ClientApp: one client's round, run by the same `FederatedTrainer.local_round` as in-process.

Each message builds a `FederatedTrainer` over this client's data only (SuperNode's `--node-config
"partition-id=I num-partitions=K"`; optional `ledger-dir=PATH`), loads the global adapter it receives
and runs the round. Under DP, the client's privacy state comes from its ledger on disk
(`hf_fedlora.flower.ledger`) and goes back there, atomically, before the upload is returned.

Messages (the server's `action` in the config record):
- query "discover": who am I (client name, examples, local steps), nothing private;
- query "plan": calibrate this client's noise for the run's planned steps, composed with what its data
  already spent (refused if that would exceed the target);
- train: one (sub-)round from the global adapter; the reply holds the upload and the privacy report;
- query "account" (client unit): a round this client was not sampled in still counts in its accountant.
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

from ..trainer import FederatedTrainer
from .ledger import PrivacyLedger, data_key, default_ledger_dir, generator_fingerprint
from .task import load_task, training_args_from_run_config

app = ClientApp()


class FlowerClient:
    """This node's client: its data, a trainer over them alone, and (under DP) its privacy ledger."""

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
        self.ledger_dir = node_config.get("ledger-dir") or default_ledger_dir()
        self.data_key = data_key(self.data) if self.privacy.enabled else None

    # --- the actions ---------------------------------------------------------------------
    def discover(self) -> dict[str, Any]:
        """Public facts: client sizes are treated as public (they set q and sigma); label counts only when the run
        publishes unprotected statistics (or is not private)."""
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
        """Fix this client's noise and step budget for the run, composed with what its data already spent."""
        if not self.privacy.enabled:
            return {}
        plan_id = str(config["plan-id"])
        ledger = PrivacyLedger.open(self.ledger_dir, self.data_key)
        if ledger.plan_id == plan_id and ledger.client is not None:  # planned already (a repeated message)
            return self._report(self._load(config))
        if ledger.unit is not None and ledger.unit != self.privacy.unit:
            raise ValueError(
                f"client {self.name!r}: its data already spent privacy under dp_unit={ledger.unit!r}, this run uses "
                f"{self.privacy.unit!r}; the two cannot be composed. Use dp_unit={ledger.unit!r}."
            )
        if ledger.history:
            self.privacy.compose_with({"unit": self.privacy.unit, "clients": {self.name: {"history": ledger.history}}})
        self.privacy.plan(
            {self.name: len(self.data)},
            self.trainer._logical_batch_size,  # the expected Poisson batch: q = logical / n
            {self.name: int(config["planned-steps"])},
            self.trainer.args.device,
            client_rate=float(config["client-rate"]),
            releases_per_round=int(config["releases-per-round"]),
            client_indices={self.name: self.partition_id},
            total_examples=int(config["total-examples"]),
        )
        client = self.privacy.clients[self.name]
        if ledger.client is not None:  # continue these data's secret streams: never re-derive (replay) them
            saved = self.privacy.client_from_state(ledger.client, self.trainer.args.device)
            client.noise_generator.set_state(saved.noise_generator.get_state())
            client.sampling_generator.set_state(saved.sampling_generator.get_state())
        ledger.unit, ledger.plan_id = self.privacy.unit, plan_id
        ledger.seeded = ledger.seeded or self.privacy.seeded
        self._save(ledger)
        return self._report(ledger)

    def train(
        self, global_state: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor] | None, list[float], dict[str, Any]]:
        """One (sub-)round: (upload or None, losses (empty under DP), privacy report). The ledger is on disk
        before this returns, i.e. before anything leaves the client."""
        round_index, sub_round = int(config["round"]), int(config["sub-round"])
        self.trainer.load_global_state(global_state)
        ledger = self._load(config)
        if ledger is None:
            upload, losses = self.trainer.local_round(self.name, round_index, sub_round, int(config["steps"]))
            return upload, losses, {}
        noise_state = generator_fingerprint(self.privacy.clients[self.name].noise_generator.get_state())
        if self.privacy.unit == "client" and bool(config.get("account-round")):
            self.privacy.record_step(self.name)  # the round counts from its first release on
        upload, losses = self.trainer.local_round(self.name, round_index, sub_round, int(config["steps"]))
        ledger.releases.append(
            {
                "plan_id": ledger.plan_id,
                "round": round_index,
                "sub_round": sub_round,
                "released": upload is not None,
                "noise_state": noise_state,
            }
        )
        self._save(ledger)
        return upload, losses, self._report(ledger)

    def account(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Client unit: a round this client was not sampled in is still one step of its accountant."""
        ledger = self._load(config)
        if ledger is None:
            return {}
        self.privacy.record_step(self.name)
        self._save(ledger)
        return self._report(ledger)

    # --- the ledger ----------------------------------------------------------------------
    def _load(self, config: Mapping[str, Any]) -> PrivacyLedger | None:
        if not self.privacy.enabled:
            return None
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
        ledger.save()

    def _report(self, ledger: PrivacyLedger) -> dict[str, Any]:
        self.privacy.seeded = ledger.seeded
        return self.privacy.report()


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
        return _reply(msg, {"privacy": client.plan(config)})
    if action == "account":
        return _reply(msg, {"privacy": client.account(config)})
    raise ValueError(f"unknown query action {action!r}; expected discover, plan or account")


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = _config(msg)
    client = FlowerClient(context.run_config, context.node_config)
    state = msg.content["global"].to_torch_state_dict()
    upload, losses, report = client.train(state, config)
    content = {"client": client.name, "num-examples": len(client.data), "losses": losses, "privacy": report}
    return _reply(msg, content, upload)
