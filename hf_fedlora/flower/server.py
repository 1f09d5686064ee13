"""The Flower ServerApp: the one server half (`hf_fedlora.server.Federation`) over a Flower Grid.

The server never sees examples. It builds the model from the task (the shared initial adapter, the final save),
learns each client's facts from a discover query, and hands the federation a Grid transport: the plan goes out as
"plan" queries, each (sub-)round as "train" messages carrying the global adapter. The federation samples, applies the
min-clients rule, aggregates and keeps the privacy account exactly as in process. At the end it writes the adapter,
the model card and the federated record, each file with `os.replace`.

Under distributed noise (`dp-noise-placement = "distributed"`, client unit) or `secure-aggregation = true` each
sub-round's encoded uploads are summed by secure aggregation (`hf_fedlora.flower.secure_sum`: key agreement, Shamir
shares and pairwise masks, in three "query.secagg" exchanges around the "train" message), so the federation
receives only their sum.

Run config keys of its own: `task`, `output-dir`, `num-clients` (SuperNodes to wait for), `round-timeout`,
`wait-timeout` and `secure-sum-timeout` (seconds). `min-clients-per-round` is the trainer's
`min_clients_per_round`, with the same meaning (and under distributed noise the fewest shares a sum may hold).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from transformers.utils import logging

from ..federation.adapter_state import adapter_parameters, load_into, snapshot
from ..federation.secure_mean import SHARES, SUMMED, SecureMeanEncoding
from ..hub import FEDERATED_RECORD_NAME, model_record, save_model_card
from ..methods import FedLoraConfig
from ..privacy.client_level import ClientLevelPrivacy
from ..privacy.distributed_noise import DistributedNoisePlan
from ..privacy.modes import privacy_from_args, server_accounts
from ..server import SECURE_SUM, ClientFacts, ClientFailure, ClientRelease, Federation, PlanRequest, SecureSumRelease
from .secure_sum import SecureSumAborted, SecureSumConfig, SecureSumSession, default_threshold, run_secure_sum
from .task import load_task, training_args_from_run_config

logger = logging.get_logger(__name__)
app = ServerApp()
POLL_SECONDS = 1.0
SECURE_SUM_RECORD = "secagg"  # the record of a message that carries a secure-sum stage
SECURE_SUM_DESCRIPTION = (
    "secure aggregation across the SuperNodes (Bonawitz et al., 2017: pairwise masks from key agreement, Shamir-"
    "shared keys for dropouts): the server received only masked uploads and their sum"
)


class GridClients:
    """The federation's client runner over a Flower Grid: who is connected, the plan, and the rounds."""

    def __init__(
        self, grid: Grid, num_clients: int, round_timeout: float, wait_timeout: float, secure_sum_timeout: float = 120
    ):
        self.grid = grid
        self.num_clients = num_clients
        self.round_timeout = round_timeout
        self.wait_timeout = wait_timeout
        self.secure_sum_timeout = secure_sum_timeout
        self.noise_plan: DistributedNoisePlan | None = None  # set under distributed noise: uploads are summed securely
        self.min_clients: int | None = None  # min_clients_per_round: the fewest uploads a secure mean may hold
        self.plan_id = secrets.token_hex(8)  # which plan a client's ledger is on; a new run is a new plan
        self.nodes: dict[str, int] = {}  # client name -> current node id (a restarted SuperNode gets a new one)
        self.facts: dict[str, dict[str, Any]] = {}  # client name -> what it said of itself

    def plan(self, requests: Mapping[str, PlanRequest]) -> dict[str, dict[str, Any]]:
        configs = {
            name: {
                "action": "plan",
                "plan-id": self.plan_id,
                "planned-steps": int(request.planned_steps),
                "total-examples": int(request.total_examples),
            }
            for name, request in requests.items()
        }
        self.wait_for(list(configs))
        answers, failed = self._send("query", configs, group="plan")
        if failed:
            raise RuntimeError("Privacy planning failed, nothing was trained: " + "; ".join(failed.values()))
        return {name: content["plan"] for name, (content, _) in answers.items()}

    def run(
        self,
        names: Sequence[str],
        round_index: int,
        sub_round: int,
        steps: Mapping[str, int],
        global_state: Mapping[str, torch.Tensor],
        progress: bool,
        secure_mean: SecureMeanEncoding | None = None,
    ) -> Iterator[tuple[str, ClientRelease | ClientFailure | SecureSumRelease]]:
        """Every named client's round at once; replies in the given order (the same sums as in process). Under
        distributed noise or secure aggregation the uploads arrive only as their secure sum."""
        self.wait_for(list(names))
        configs = {
            name: {"round": round_index, "sub-round": sub_round, "steps": int(steps[name]), "plan-id": self.plan_id}
            for name in names
        }
        arrays = ArrayRecord({key: tensor for key, tensor in global_state.items()})
        group = f"{round_index}.{sub_round}"
        if self.noise_plan is not None:
            plan = self.noise_plan
            extra = {"noise-plan": json.dumps(plan.to_dict())}
            yield from self._secure_round(
                names, configs, arrays, group, plan.dimension, plan.bits, plan.min_shares, extra
            )
            return
        if secure_mean is not None:
            minimum = len(names) if self.min_clients is None else min(self.min_clients, len(names))
            extra = {"secure-mean": json.dumps(secure_mean.to_dict())}
            yield from self._secure_round(
                names, configs, arrays, group, secure_mean.size, secure_mean.bits, minimum, extra
            )
            return
        answers, failed = self._send("train", configs, group=f"{round_index}.{sub_round}", arrays=arrays)
        for name in names:
            if name in failed:
                yield name, ClientFailure(failed[name])
                continue
            content, upload = answers[name]
            yield name, ClientRelease(upload, list(content["losses"]), _privacy_of(content))

    def _secure_round(
        self,
        names: Sequence[str],
        configs: Mapping[str, dict[str, Any]],
        arrays: ArrayRecord,
        group: str,
        size: int,
        bits: int,
        min_contributors: int,
        extra: Mapping[str, Any],
    ) -> Iterator[tuple[str, ClientRelease | ClientFailure | SecureSumRelease]]:
        """One (sub-)round whose encoded uploads (`size` residues modulo 2^bits; the encoding is named in `extra`,
        which rides on the train message) reach the federation only as their secure sum, a SecureSumRelease;
        each client's own release carries its losses and privacy report and no upload. Fewer than
        `min_contributors` (or the threshold) at any stage raise `SecureSumAborted` before anything is revealed."""
        present = [name for name in names if name in self.nodes]
        config = SecureSumConfig(
            bits=bits,
            threshold=default_threshold(len(present), min_contributors),
            min_contributors=min_contributors,
            stage_timeout=self.secure_sum_timeout,
        )
        replies: dict[str, dict[str, Any]] = {}

        def exchange(stage: str, requests: Mapping[str, Mapping[str, Any]], timeout: float):
            configs = {name: {"stage": stage, **request} for name, request in requests.items()}
            answers, _ = self._send("query.secagg", configs, group=f"{group}.{stage}", timeout=timeout, secure=True)
            return {name: content for name, (content, _) in answers.items()}

        def upload(stage: str, requests: Mapping[str, Mapping[str, Any]], timeout: float):
            train = {name: {**configs[name], **extra} for name in requests}
            answers, _ = self._send("train", train, group=group, arrays=arrays, timeout=timeout, stages=requests)
            replies.update({name: content for name, (content, _) in answers.items()})
            return {name: upload["masked"].numpy() for name, (_, upload) in answers.items() if upload}

        try:
            session = SecureSumSession(present, size, config)
            result = run_secure_sum(session, exchange, upload, upload_timeout=self.round_timeout)
        except SecureSumAborted as error:
            raise SecureSumAborted(
                f"(sub-)round {group}: {error}. Nothing of this round was released; its privacy stays accounted.",
                error.stage,
                error.dropped,
            ) from error
        for name in names:
            if name in result.contributors:
                content = replies[name]
                yield name, ClientRelease(None, list(content["losses"]), _privacy_of(content))
            else:
                stage = result.dropped.get(name, "connection")
                yield name, ClientFailure(f"{name}: left the secure sum at its {stage} stage")
        total = torch.from_numpy(result.total.astype("int64"))
        yield SECURE_SUM, SecureSumRelease({SUMMED: total, SHARES: torch.tensor(len(result.contributors))})

    # --- talking to the nodes -----------------------------------------------------------
    def _send(
        self,
        kind: str,
        configs: Mapping[str, Mapping[str, Any]],
        group: str,
        arrays: ArrayRecord | None = None,
        timeout: float | None = None,
        secure: bool = False,
        stages: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[dict[str, tuple[dict[str, Any], dict[str, torch.Tensor] | None]], dict[str, str]]:
        """Send each named client its message; ({name: (reply content, upload)}, {name: why it failed}).
        `secure`: a secure-sum stage, whose request and reply are plain records (bytes included); `stages`: each
        client's secure-sum request riding on its train message. Every message expires with its timeout, so a late
        node never runs a stale round."""
        timeout = self.round_timeout if timeout is None else timeout
        failed = {name: f"{name}: no SuperNode connected" for name in configs if name not in self.nodes}
        messages, sent = [], {}
        for name, config in configs.items():
            if name in failed:
                continue
            content = RecordDict({"config": ConfigRecord(dict(config))})
            if arrays is not None:
                content["global"] = arrays
            if stages is not None:
                content[SECURE_SUM_RECORD] = ConfigRecord(dict(stages[name]))
            node = self.nodes[name]
            messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=group, ttl=timeout))
            sent[node] = name
        answers = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout) if messages else []:
            name = sent.get(reply.metadata.src_node_id)
            if name is None:
                continue
            if reply.has_error():
                failed[name] = f"{name}: {reply.error.reason}"
                continue
            if secure:
                answers[name] = (dict(reply.content[SECURE_SUM_RECORD]), None)
                continue
            content = json.loads(reply.content["info"]["json"])
            upload = reply.content["upload"].to_torch_state_dict() if "upload" in reply.content else None
            answers[name] = (content, upload)
        for name in sent.values():
            if name not in answers and name not in failed:
                failed[name] = f"{name}: no reply within {timeout}s"
        return answers, failed

    def wait_for(self, names: Sequence[str] | None) -> None:
        """Learn who is connected (a restarted SuperNode has a new node id) until the named clients (None: all
        num-clients) are there or wait-timeout passes."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            self._discover()
            done = len(self.nodes) >= self.num_clients if names is None else all(n in self.nodes for n in names)
            if done:
                return
            if time.monotonic() > deadline:
                if names is None:
                    raise RuntimeError(
                        f"only {len(self.nodes)} of num-clients={self.num_clients} SuperNodes connected within "
                        f"wait-timeout={self.wait_timeout}s"
                    )
                return  # the missing ones fail this round; min_clients_per_round decides
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
            self.facts[info["client"]] = info


def _privacy_of(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """A client's privacy report from its train reply (example unit), as the federation checks it."""
    report = content.get("privacy")
    return {**report["client"], "seeded": report.get("seeded")} if report else None


class FlowerServer:
    """The server side of one run: the model, the Grid transport, the Federation, and the saved result."""

    def __init__(self, grid: Grid, run_config: Mapping[str, Any]):
        self.run_config = dict(run_config)
        if not self.run_config.get("output-dir"):
            raise ValueError("run config 'output-dir' is required: the folder the final adapter is written to")
        if "num-clients" not in self.run_config:
            raise ValueError("run config 'num-clients' is required: how many SuperNodes (partitions) take part")
        self.output_dir = str(self.run_config["output-dir"])
        self.task = load_task(self.run_config)
        self.args = training_args_from_run_config(self.run_config, self.output_dir)
        if self.args.private and self.args.dp_unit == "example" and self.args.dp_noise_calibration == "shared":
            raise ValueError(
                "dp_noise_calibration='shared' is not supported by the Flower apps: each client calibrates its own "
                "noise against its own ledger. Use 'per_client'."
            )
        self.model = self.task.build_model()
        self.config = self.model.peft_config[self.model.active_adapter]
        if not isinstance(self.config, FedLoraConfig):
            raise ValueError(f"the task's model has a {type(self.config).__name__}; it needs an hf_fedlora config")
        self.method = self.config.build_method()
        self.method.initialize(self.model)  # the shared seeded A, as every in-process client starts from
        self.adapter = adapter_parameters(self.model)
        self.global_state = snapshot(self.adapter)
        self.clients = GridClients(
            grid,
            int(self.run_config["num-clients"]),
            float(self.run_config.get("round-timeout", 600)),
            float(self.run_config.get("wait-timeout", 120)),
            float(self.run_config.get("secure-sum-timeout", 120)),
        )
        self.federation: Federation | None = None

    def run(self) -> dict[str, Any]:
        """All rounds, then the saved adapter; returns the federated record."""
        args = self.args
        self.clients.wait_for(None)
        facts = self.clients.facts
        names = sorted(facts, key=lambda name: facts[name]["partition-id"])
        ids = [facts[name]["partition-id"] for name in names]
        if ids != list(range(self.clients.num_clients)):
            raise ValueError(f"expected partition ids 0..{self.clients.num_clients - 1}, the SuperNodes have {ids}")
        privacy = privacy_from_args(args)
        self.federation = Federation(
            self.method,
            args,
            {name: ClientFacts(facts[name]["num-examples"], facts[name]["local-steps"]) for name in names},
            self.global_state,
            self.clients,
            client_level=privacy if isinstance(privacy, ClientLevelPrivacy) else None,
            accounts=server_accounts(args),
        )
        self.federation.plan(args.num_rounds)
        self.clients.min_clients = args.min_clients_per_round
        self.federation.secure_sum = SECURE_SUM_DESCRIPTION
        if isinstance(privacy, ClientLevelPrivacy) and privacy.distributed is not None:
            self.clients.noise_plan = privacy.distributed
            privacy.secure_sum = SECURE_SUM_DESCRIPTION
        if not self.federation.private:
            logger.warning("Non-private run: no differential-privacy guarantee (set dp_target_epsilon for one).")
        for round_index in range(args.num_rounds):
            entry = self.federation.run_round(round_index)
            if self.federation.private:
                entry.update(epsilon=self.federation.max_epsilon(), delta=args.dp_target_delta)
            logger.info(f"round {round_index + 1}: {entry}")
        self.save()
        return self.record()

    def record(self) -> dict[str, Any]:
        """The federated record, as `FederatedTrainer.federated_record` writes it, plus how the run was driven."""
        facts = self.clients.facts
        histograms = {
            name: json.loads(info["label-histogram"]) for name, info in facts.items() if "label-histogram" in info
        }
        record = {
            **model_record(self.model, self.config),
            **self.federation.record(dict(sorted(histograms.items()))),
            "partition": {"scheme": "flower", "partitions": len(facts)},
            "continued_from": None,
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


__all__ = ["FlowerServer", "GridClients", "app", "run_server"]
