"""The Flower ServerApp: the in-process trainer's round loop, over a Flower Grid.

The server never sees examples. It builds the model from the task (for the shared initial adapter and
the final save), learns each client's public facts (name, size, local steps) from a discover query,
samples participants as the in-process trainer does (published seed for the example unit; secret
Poisson sampling for the client unit), sends every client its privacy plan, runs each round's
sub-rounds (DEeR: two), combines the uploads with the method's aggregate and merges the result into
the full global adapter, exactly as `FederatedTrainer.apply_uploads` does. At the end it writes the
adapter, the model card and the federated record like `save_model`, each file with `os.replace`.

Run config keys of its own: `task`, `output-dir`, `num-clients` (SuperNodes to wait for),
`min-clients-per-round` (default: all of the round's participants must answer), `round-timeout`
and `wait-timeout` (seconds).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from transformers.utils import logging

from ..federation.adapter_state import adapter_parameters, load_into, snapshot
from ..hub import FEDERATED_RECORD_NAME, model_record, save_model_card
from ..methods import FedLoraConfig
from ..privacy import FederatedPrivacy
from .task import load_task, training_args_from_run_config

logger = logging.get_logger(__name__)
app = ServerApp()
POLL_SECONDS = 1.0
# Privacy settings every client reports alike; the server copies them from the first report.
SHARED_PRIVACY_KEYS = ("private", "unit", "delta", "target_epsilon", "accountant", "clip_norm", "clipping")


class FlowerServer:
    """The server side of one run: global adapter, participants, plan, rounds, and the saved result."""

    def __init__(self, grid: Grid, run_config: Mapping[str, Any]):
        self.grid = grid
        self.run_config = dict(run_config)
        if not self.run_config.get("output-dir"):
            raise ValueError("run config 'output-dir' is required: the folder the final adapter is written to")
        if "num-clients" not in self.run_config:
            raise ValueError("run config 'num-clients' is required: how many SuperNodes (partitions) take part")
        self.output_dir = str(self.run_config["output-dir"])
        self.num_clients = int(self.run_config["num-clients"])
        self.round_timeout = float(self.run_config.get("round-timeout", 600))
        self.wait_timeout = float(self.run_config.get("wait-timeout", 120))
        self.task = load_task(self.run_config)
        self.args = training_args_from_run_config(self.run_config, self.output_dir)
        self.model = self.task.build_model()
        self.config = self.model.peft_config[self.model.active_adapter]
        if not isinstance(self.config, FedLoraConfig):
            raise ValueError(f"the task's model has a {type(self.config).__name__}; it needs an hf_fedlora config")
        self.method = self.config.build_method()
        self.method.initialize(self.model)  # the shared seeded A, as every in-process client starts from
        self.adapter = adapter_parameters(self.model)
        self.global_state = snapshot(self.adapter)
        args = self.args
        # Server-side privacy: only the client unit's secret participation sampling (and the run's settings).
        self.privacy = FederatedPrivacy.from_args(args)
        self.plan_id = secrets.token_hex(8)  # which plan a client's ledger is on; a new run is a new plan
        self.nodes: dict[str, int] = {}  # client name -> current node id (a restarted SuperNode gets a new one)
        self.clients: dict[str, dict[str, Any]] = {}  # client name -> its public facts
        self.reports: dict[str, dict[str, Any]] = {}  # client name -> its latest privacy report
        self.round_history: list[dict[str, Any]] = []

    # --- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """All rounds, then the saved adapter; returns the federated record."""
        args = self.args
        self._wait_for(None)
        names = sorted(self.clients, key=lambda name: self.clients[name]["partition-id"])
        ids = sorted(self.clients[name]["partition-id"] for name in names)
        if ids != list(range(self.num_clients)):
            raise ValueError(f"expected partition ids 0..{self.num_clients - 1}, the SuperNodes have {ids}")
        if args.clients_per_round is not None and args.clients_per_round > len(names):
            raise ValueError(f"clients_per_round={args.clients_per_round} exceeds the {len(names)} clients")
        rounds = range(args.num_rounds)
        client_unit = self.privacy.enabled and self.privacy.unit == "client"
        client_rate = (args.clients_per_round or len(names)) / len(names)
        if client_unit:
            self.privacy.client_rate = client_rate
            schedule = {r: self.privacy.sample_participants(names) for r in rounds}
            planned = dict.fromkeys(names, len(rounds))
        else:  # the in-process trainer's published-seed sampling, so both drivers pick the same clients
            rng = np.random.default_rng(args.seed)
            count = args.clients_per_round or len(names)
            schedule = {
                r: [names[i] for i in sorted(rng.choice(len(names), size=count, replace=False))] for r in rounds
            }
            planned = {
                name: sum(
                    self.clients[name]["local-steps"] * self.method.num_sub_rounds(r)
                    for r in rounds
                    if name in schedule[r]
                )
                for name in names
            }
        if self.privacy.enabled:
            if args.dp_noise_calibration == "shared":
                raise ValueError(
                    "dp_noise_calibration='shared' is not supported by the Flower apps: each client calibrates its "
                    "own noise against its own ledger. Use 'per_client'."
                )
            releases = max((self.method.num_sub_rounds(r) for r in rounds), default=1)
            self._plan(names, planned, client_rate, releases)
        else:
            logger.warning("Non-private run: no differential-privacy guarantee (set dp_target_epsilon for one).")
        for round_index in rounds:
            self._round(round_index, schedule[round_index], names, client_unit)
        self.save()
        return self.record()

    def _plan(self, names: list[str], planned: Mapping[str, int], client_rate: float, releases: int) -> None:
        """Each client plans its own noise (against its ledger); any refusal stops the run before training."""
        total = sum(self.clients[name]["num-examples"] for name in names)
        configs = {
            name: {
                "action": "plan",
                "plan-id": self.plan_id,
                "planned-steps": int(planned[name]),
                "client-rate": float(client_rate),
                "releases-per-round": int(releases),
                "total-examples": int(total),
            }
            for name in names
        }
        answers, failed = self._send("query", configs, group="plan")
        if failed:
            raise RuntimeError("Privacy planning failed, nothing was trained: " + "; ".join(failed.values()))
        for name, (content, _) in answers.items():
            self.reports[name] = content["privacy"]

    def _round(self, round_index: int, participants: list[str], names: list[str], client_unit: bool) -> None:
        minimum = int(self.run_config.get("min-clients-per-round", len(participants)))
        failed: dict[str, str] = {}
        losses: list[float] = []
        for sub_round in range(self.method.num_sub_rounds(round_index)):
            active = [name for name in participants if name not in failed]
            self._wait_for(active)
            state = ArrayRecord({key: tensor for key, tensor in self.global_state.items()})
            configs = {
                name: {
                    "round": round_index,
                    "sub-round": sub_round,
                    "steps": int(self.clients[name]["local-steps"]),
                    "plan-id": self.plan_id,
                    "account-round": sub_round == 0,
                }
                for name in active
            }
            answers, newly_failed = self._send("train", configs, group=f"{round_index}.{sub_round}", arrays=state)
            failed.update(newly_failed)
            answered = len(participants) - len(failed)
            if answered < min(minimum, len(participants)):
                raise RuntimeError(
                    f"round {round_index + 1}: only {answered} of {len(participants)} clients answered, below "
                    f"min-clients-per-round={minimum}; stopping. Failures: " + "; ".join(failed.values())
                )
            for name, reason in newly_failed.items():
                logger.warning(f"round {round_index + 1}: client {name!r} failed and is left out ({reason})")
            uploads, weights = [], []
            for name in active:  # participant order, as in-process: the same sums in the same order
                if name not in answers:
                    continue
                content, upload = answers[name]
                self.reports[name] = content["privacy"] or self.reports.get(name, {})
                losses.extend(content["losses"])
                if upload is not None:
                    uploads.append(upload)
                    weights.append(self._weight(name))
            if uploads:  # as FederatedTrainer's round: streaming when the method offers it, else its aggregate
                streaming = self.method.streaming_aggregator()
                if streaming is None:
                    self.global_state.update(self.method.aggregate(uploads, weights))
                else:
                    for upload, weight in zip(uploads, weights, strict=True):
                        streaming.add(upload, weight)
                    self.global_state.update(streaming.result())
        if client_unit:  # every client's accountant steps every round, sampled or not
            configs = {
                name: {"action": "account", "plan-id": self.plan_id} for name in names if name not in participants
            }
            self._wait_for(list(configs))
            answers, account_failed = self._send("query", configs, group=f"{round_index}.account")
            if account_failed:
                raise RuntimeError(f"round {round_index + 1}: accounting failed: " + "; ".join(account_failed.values()))
            for name, (content, _) in answers.items():
                self.reports[name] = content["privacy"]
        entry: dict[str, Any] = {"round": round_index + 1, "clients": len(participants) - len(failed)}
        if losses:
            entry["train_loss"] = float(np.mean(losses))
        if self.privacy.enabled:
            entry["epsilon"] = self.max_epsilon()
            entry["delta"] = self.privacy.delta
        if failed:
            entry["failed_clients"] = sorted(failed)
        self.round_history.append(entry)
        logger.info(f"round {round_index + 1}: {entry}")

    def _weight(self, name: str) -> float:
        return 1.0 if self.args.aggregation_weights == "uniform" else float(self.clients[name]["num-examples"])

    # --- talking to the nodes -----------------------------------------------------------
    def _send(
        self, kind: str, configs: Mapping[str, Mapping[str, Any]], group: str, arrays: ArrayRecord | None = None
    ) -> tuple[dict[str, tuple[dict[str, Any], dict[str, torch.Tensor] | None]], dict[str, str]]:
        """Send each named client its message; ({name: (reply content, upload)}, {name: why it failed})."""
        failed = {name: f"{name}: no SuperNode connected" for name in configs if name not in self.nodes}
        messages, sent = [], {}
        for name, config in configs.items():
            if name in failed:
                continue
            content = RecordDict({"config": ConfigRecord(dict(config))})
            if arrays is not None:
                content["global"] = arrays
            messages.append(Message(content, dst_node_id=self.nodes[name], message_type=kind, group_id=group))
            sent[self.nodes[name]] = name
        answers = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []:
            name = sent.get(reply.metadata.src_node_id)
            if name is None:
                continue
            if reply.has_error():
                failed[name] = f"{name}: {reply.error.reason}"
                continue
            content = json.loads(reply.content["info"]["json"])
            upload = reply.content["upload"].to_torch_state_dict() if "upload" in reply.content else None
            answers[name] = (content, upload)
        for name in sent.values():
            if name not in answers and name not in failed:
                failed[name] = f"{name}: no reply within round-timeout={self.round_timeout}s"
        return answers, failed

    def _wait_for(self, names: Sequence[str] | None) -> None:
        """Learn who is connected (a restarted SuperNode comes back with a new node id) until the named clients
        (None: all num-clients) are there or wait-timeout passes."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            self._discover()
            if names is None:
                done = len(self.nodes) >= self.num_clients
            else:
                done = all(name in self.nodes for name in names)
            if done:
                return
            if time.monotonic() > deadline:
                if names is None:
                    raise RuntimeError(
                        f"only {len(self.nodes)} of num-clients={self.num_clients} SuperNodes connected within "
                        f"wait-timeout={self.wait_timeout}s"
                    )
                return  # the missing ones fail this round; min-clients-per-round decides
            time.sleep(POLL_SECONDS)

    def _discover(self) -> None:
        current = set(self.grid.get_node_ids())
        self.nodes = {name: node for name, node in self.nodes.items() if node in current}
        new = current - set(self.nodes.values())
        if not new:
            return
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"action": "discover"})}),
                dst_node_id=node,
                message_type="query",
                group_id="discover",
            )
            for node in sorted(new)
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.wait_timeout):
            if reply.has_error():
                logger.warning(f"node {reply.metadata.src_node_id} failed to identify itself: {reply.error.reason}")
                continue
            info = json.loads(reply.content["info"]["json"])
            self.nodes[info["client"]] = reply.metadata.src_node_id
            self.clients[info["client"]] = info

    # --- results -------------------------------------------------------------------------
    def max_epsilon(self) -> float:
        return max(
            (c["epsilon"] for r in self.reports.values() for c in (r.get("clients") or {}).values()), default=0.0
        )

    def privacy_report(self) -> dict[str, Any]:
        """The clients' own reports (each from its ledger) in the in-process report's shape."""
        if not self.privacy.enabled:
            return {"private": False, "unit": None, "epsilon": None, "clients": {}}
        clients = {name: c for r in self.reports.values() for name, c in (r.get("clients") or {}).items()}
        base = next(iter(self.reports.values()), {})
        return {
            **{key: base.get(key) for key in SHARED_PRIVACY_KEYS},
            "private": True,
            "unit": self.privacy.unit,
            "epsilon": max((c["epsilon"] for c in clients.values()), default=0.0),
            "noise_calibration": base.get("noise_calibration"),
            "seeded": any(bool(r.get("seeded")) for r in self.reports.values()),
            "clients": dict(sorted(clients.items())),
        }

    def record(self) -> dict[str, Any]:
        """The federated record, as `FederatedTrainer.federated_record` writes it, plus how the run was driven."""
        args, config = self.args, self.config
        publish = not self.privacy.enabled or bool(args.publish_unprotected_statistics)
        names = sorted(self.clients, key=lambda name: self.clients[name]["partition-id"])
        record = {
            **model_record(self.model, config),
            "rounds": len(self.round_history),
            "num_clients": len(names),
            "clients_per_round": args.clients_per_round or len(names),
            "local_steps": args.local_steps,
            "local_epochs": args.local_epochs,
            "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "physical_batch_size": args.per_device_train_batch_size,
            "learning_rate": args.learning_rate,
            "aggregation_weights": args.aggregation_weights,
            "partition": {"scheme": "flower", "partitions": len(names)},
            "client_sizes": {name: self.clients[name]["num-examples"] for name in names},
            "client_label_histograms": {
                name: json.loads(self.clients[name]["label-histogram"])
                for name in names
                if publish and "label-histogram" in self.clients[name]
            },
            "unprotected_statistics_published": self.privacy.enabled and publish,
            "continued_from": None,
            "privacy": self.privacy_report(),
            "round_history": self.round_history,
            "driver": {"name": "flower", "flwr": importlib.metadata.version("flwr")},
        }
        return json.loads(json.dumps(record, default=lambda v: v.item() if hasattr(v, "item") else str(v)))

    def save(self) -> None:
        """Adapter, tokenizer, card and record into output-dir, each moved in with os.replace (record last)."""
        os.makedirs(self.output_dir, exist_ok=True)
        staging = tempfile.mkdtemp(dir=self.output_dir, prefix=".staging-")
        try:
            load_into(self.adapter, self.global_state)
            self.model.save_pretrained(staging, safe_serialization=True)
            if self.task.processing_class is not None:
                self.task.processing_class.save_pretrained(staging)
            record = self.record()
            save_model_card(staging, record)  # replaces PEFT's generic README.md
            with open(os.path.join(staging, FEDERATED_RECORD_NAME), "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=2)
            files = sorted(os.listdir(staging), key=lambda f: (f == FEDERATED_RECORD_NAME, f != ADAPTER_CONFIG_NAME))
            for name in files:
                os.replace(os.path.join(staging, name), os.path.join(self.output_dir, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run the whole federation over `grid`; returns the federated record (also written to output-dir)."""
    return FlowerServer(grid, run_config).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


__all__ = ["FlowerServer", "app", "run_server"]
