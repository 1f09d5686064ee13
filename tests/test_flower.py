"""The Flower apps: same adapter and epsilons as the in-process trainer, ledgers that survive restarts, failures.

Skipped without flwr (the core venv); `scripts/test_flower.sh` runs them in the flower venv.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from peft import set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from hf_fedlora import FederatedTrainer  # noqa: E402
from hf_fedlora.federation.adapter_state import adapter_parameters, snapshot  # noqa: E402
from hf_fedlora.flower import client as client_module  # noqa: E402
from hf_fedlora.flower.ledger import PrivacyLedger, data_key  # noqa: E402
from hf_fedlora.flower.secure_sum import SecureSumAborted  # noqa: E402
from hf_fedlora.flower.server import run_server  # noqa: E402
from hf_fedlora.flower.task import load_task, training_args_from_run_config  # noqa: E402
from hf_fedlora.privacy.accountants import epsilon_from_history  # noqa: E402

NUM_CLIENTS = 2


@pytest.fixture(autouse=True)
def server_identity():
    """What a ServerApp process has set when it runs: the identity new messages are stamped with."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class LocalGrid(Grid):
    """A Grid with no network: each node is a ClientApp and its Context, called in this process. Like a SuperNode,
    a ClientApp exception comes back as an error reply. `restart(node)` gives the node a new id and empty state."""

    def __init__(self, run_config: dict, ledger_dir: Path, fail: dict | None = None):
        self.run_config = run_config
        self.ledger_dir = ledger_dir
        self.fail = fail or {}  # partition id -> round index at which its train handler raises
        self.num_clients = int(run_config["num-clients"])
        self.nodes: dict[int, Context] = {}
        self.replies: dict[str, Message] = {}
        for partition in range(self.num_clients):
            self._start(partition)

    def _start(self, partition: int) -> int:
        node_id = uuid.uuid4().int >> 65
        node_config = {
            "partition-id": partition,
            "num-partitions": self.num_clients,
            "ledger-dir": str(self.ledger_dir),
        }
        self.nodes[node_id] = Context(
            run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=self.run_config
        )
        return node_id

    def restart(self, partition: int) -> None:
        node = next(n for n, c in self.nodes.items() if c.node_config["partition-id"] == partition)
        del self.nodes[node]
        self._start(partition)

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            context = self.nodes[message.metadata.dst_node_id]
            try:
                partition = context.node_config["partition-id"]
                if message.metadata.message_type == "train":
                    round_index = int(message.content["config"]["round"])
                    if self.fail.get(partition) == round_index:
                        raise RuntimeError(f"client_{partition} crashed in round {round_index}")
                reply = client_module.app(message, context)
            except Exception as error:  # noqa: BLE001 - the SuperNode's behaviour: an error reply
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def tiny_run_config(tmp_path: Path, method: str = "ffa_lora", dp_unit: str | None = None, **extra) -> dict:
    config = {
        "task": "hf_fedlora.flower.tasks:tiny_bert",
        "method": method,
        "output-dir": str(tmp_path / "flower_out"),
        "num-clients": NUM_CLIENTS,
        "num-server-rounds": 2,
        "examples-per-client": 24,
        "local-steps": 2,
        "per-device-train-batch-size": 8,
        "learning-rate": 0.05,
        "dp-accountant": "rdp",
        "wait-timeout": 5,
    }
    if dp_unit is not None:
        config.update({"dp-unit": dp_unit, "dp-target-epsilon": 8.0, "dp-target-delta": 1e-4, "dp-secret-seed": 123})
    config.update(extra)
    return config


def in_process(run_config: dict, tmp_path: Path) -> FederatedTrainer:
    """The reference: FederatedTrainer.train() over the same task's clients, in one process."""
    task = load_task(run_config)
    clients = [task.load_client_data(i, NUM_CLIENTS) for i in range(NUM_CLIENTS)]
    args = training_args_from_run_config(run_config, str(tmp_path / "in_process"))
    trainer = FederatedTrainer(task.build_model(), args, train_dataset=clients)
    trainer.train()
    return trainer


def saved_adapter(run_config: dict, folder: Path) -> dict[str, torch.Tensor]:
    """The adapter the server wrote, loaded with plain PEFT into a fresh model of the task."""
    model = load_task(run_config).build_model()
    set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    return snapshot(adapter_parameters(model))


def client_epsilons(record: dict) -> dict[str, float]:
    return {name: c["epsilon"] for name, c in record["privacy"]["clients"].items()}


@pytest.mark.parametrize(
    "method, dp_unit",
    [
        ("ffa_lora", None),
        ("ffa_lora", "example"),
        ("deer", None),
        ("deer", "example"),
        ("deer", "client"),
        ("fedsvd", "example"),  # the server's SVD step runs in the one server half: A travels back to clients
    ],
)
def test_flower_run_equals_in_process_trainer(tmp_path, method, dp_unit):
    run_config = tiny_run_config(tmp_path, method, dp_unit)
    record = run_server(LocalGrid(run_config, tmp_path / "ledgers"), run_config)
    trainer = in_process(run_config, tmp_path)

    expected = trainer.global_state()
    written = saved_adapter(run_config, tmp_path / "flower_out")
    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(written[key], tensor, rtol=1e-6, atol=1e-7)
    assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k), "B never trained: vacuous test"
    if dp_unit is None:
        assert record["privacy"]["private"] is False
        return
    reference = trainer.privacy_report()
    assert record["privacy"]["unit"] == dp_unit
    if dp_unit == "client":  # one history for the federation, and nothing about who took part
        assert record["privacy"]["history"] == reference["history"]
        assert record["privacy"]["epsilon"] == pytest.approx(reference["epsilon"], rel=1e-12)
        assert "client_" not in json.dumps(record)
    else:
        assert client_epsilons(record) == pytest.approx(client_epsilons({"privacy": reference}), rel=1e-12)
        for name, client in record["privacy"]["clients"].items():
            assert client["history"] == reference["clients"][name]["history"]
    assert (tmp_path / "flower_out" / "README.md").read_text().count(dp_unit) > 0


def distributed_run_config(tmp_path: Path, clients: int = 3, **extra) -> dict:
    """Client-level DP with distributed noise: each client's noise share, summed by secure aggregation; the noise
    planned for clients - 1 surviving shares."""
    config = {
        "num-clients": clients,
        "dp-noise-placement": "distributed",
        "dp-neighbouring-relation": "zero_out_one",
        "min-clients-per-round": clients - 1,
    }
    return tiny_run_config(tmp_path, "ffa_lora", "client", **{**config, **extra})


def in_process_with_failures(run_config: dict, tmp_path: Path, fail: dict[int, int]) -> FederatedTrainer:
    """The in-process reference (the secure sum simulated) with the same clients failing in the same rounds."""
    task = load_task(run_config)
    clients = int(run_config["num-clients"])
    data = {f"client_{i}": task.load_client_data(i, clients) for i in range(clients)}
    args = training_args_from_run_config(run_config, str(tmp_path / "in_process"))

    class FailingTrainer(FederatedTrainer):
        def local_round(self, name, round_index, sub_round, steps):
            if fail.get(int(name.split("_")[1])) == round_index:
                raise RuntimeError(f"{name} crashed in round {round_index}")
            return super().local_round(name, round_index, sub_round, steps)

    trainer = FailingTrainer(task.build_model(), args, train_dataset=data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("fail", [{}, {1: 0}], ids=["every_client", "a_dropout_within_the_threshold"])
def test_the_secure_sum_gives_the_in_process_adapter_bit_for_bit(tmp_path, fail):
    """Distributed noise over Flower: real secure aggregation (keys, Shamir shares, pairwise masks); in process the
    sum is simulated. With the same secret seed each client's encoded upload and noise share are the same, and the
    masks cancel exactly, so the two adapters are equal, also when a client drops out after the keys were shared
    (its masks are then rebuilt from the others' shares)."""
    run_config = distributed_run_config(tmp_path)
    grid = LocalGrid(run_config, tmp_path / "ledgers", fail=fail)
    record = run_server(grid, run_config)
    trainer = in_process_with_failures(run_config, tmp_path, fail)
    expected = trainer.global_state()
    written = saved_adapter(run_config, tmp_path / "flower_out")
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k), "B never trained: vacuous test"
    privacy, reference = record["privacy"], trainer.privacy_report()
    assert privacy["noise_placement"] == "distributed" and privacy["secure_sum"].startswith("secure aggregation")
    assert privacy["distributed_noise"] == reference["distributed_noise"]
    assert privacy["epsilon"] == pytest.approx(reference["epsilon"], rel=1e-12) and privacy["epsilon"] <= 8.0
    assert "client_" not in json.dumps(record)
    card = (tmp_path / "flower_out" / "README.md").read_text()
    assert "the server received only masked uploads and their sum" in card and "simulated" not in card


@pytest.mark.parametrize("fail", [{}, {2: 1}], ids=["every_client", "a_dropout_within_the_threshold"])
def test_secure_aggregation_of_dp_sgd_uploads_gives_the_in_process_adapter_and_epsilons(tmp_path, fail):
    """Example-level DP with the weighted mean taken by SecAgg: the same adapter as in process (where the sum is
    simulated) bit for bit, and the same per-client epsilons; a client failing after the keys were shared is left
    out of the mean (its masks rebuilt)."""
    extra = {"num-clients": 3, "secure-aggregation": True, "min-clients-per-round": 2}
    run_config = tiny_run_config(tmp_path, "ffa_lora", "example", **extra)
    record = run_server(LocalGrid(run_config, tmp_path / "ledgers", fail=fail), run_config)
    trainer = in_process_with_failures(run_config, tmp_path, fail)
    expected = trainer.global_state()
    written = saved_adapter(run_config, tmp_path / "flower_out")
    for key, tensor in expected.items():
        assert torch.equal(written[key], tensor), key
    assert client_epsilons(record) == pytest.approx(client_epsilons({"privacy": trainer.privacy_report()}), rel=1e-12)
    assert record["secure_aggregation"]["sum"].startswith("secure aggregation across the SuperNodes")
    assert record["failed_clients"] == ({"2": ["client_2"]} if fail else {})


def test_the_secure_sum_reveals_nothing_when_more_clients_drop_than_the_plan_allows(tmp_path):
    run_config = distributed_run_config(tmp_path)
    with pytest.raises(SecureSumAborted, match=r"round 1.0: secure sum aborted at upload: 1 uploads.*Nothing of this"):
        run_server(LocalGrid(run_config, tmp_path / "ledgers", fail={0: 1, 1: 1}), run_config)
    assert not (tmp_path / "flower_out" / "federated_training.json").exists()


class RestartingGrid(LocalGrid):
    """Restarts one client's SuperNode (new node id, empty context) after it answered a given round's training."""

    def __init__(self, *args, restart_partition: int, after_group: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.restart_partition, self.after_group, self.restarted = restart_partition, after_group, False

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        if not self.restarted and any(m.metadata.group_id == self.after_group for m in messages):
            self.restart(self.restart_partition)
            self.restarted = True
        return ids


def test_restarted_supernode_continues_its_ledger(tmp_path):
    """A SuperNode restarted between rounds keeps its budget and its noise stream: same epsilon and same adapter as
    the uninterrupted run (a reset stream would replay round 1's noise and change both), no noise state reused."""
    run_config = tiny_run_config(tmp_path, "ffa_lora", "example")
    ledgers = tmp_path / "ledgers"
    grid = RestartingGrid(run_config, ledgers, restart_partition=1, after_group="0.0")
    record = run_server(grid, run_config)
    assert grid.restarted
    trainer = in_process(run_config, tmp_path)
    uninterrupted = client_epsilons({"privacy": trainer.privacy_report()})
    assert client_epsilons(record)["client_1"] >= uninterrupted["client_1"] - 1e-12
    assert client_epsilons(record) == pytest.approx(uninterrupted, rel=1e-12)
    written = saved_adapter(run_config, tmp_path / "flower_out")
    for key, tensor in trainer.global_state().items():
        torch.testing.assert_close(written[key], tensor, rtol=1e-6, atol=1e-7)

    task = load_task(run_config)
    ledger = PrivacyLedger.open(ledgers, data_key(task.load_client_data(1, NUM_CLIENTS)))
    noise_states = [release["noise_state"] for release in ledger.releases]
    assert len(noise_states) == 2 and len(set(noise_states)) == 2  # round 2 drew on from where round 1 stopped
    assert ledger.history == record["privacy"]["clients"]["client_1"]["history"]


def test_ledger_composes_across_runs(tmp_path):
    """The ledger is keyed by the data, not the run: a second run on the same data starts from what the first spent
    (its history comes first, its epsilon only grows) instead of a fresh budget."""
    run_config = tiny_run_config(tmp_path, "ffa_lora", "example")
    first = run_server(LocalGrid(run_config, tmp_path / "ledgers"), run_config)
    second = run_server(LocalGrid(run_config, tmp_path / "ledgers"), run_config)
    for name, before in first["privacy"]["clients"].items():
        after = second["privacy"]["clients"][name]
        assert after["history"][: len(before["history"])] == before["history"]
        assert after["steps"] == 2 * before["steps"]
        assert before["epsilon"] <= after["epsilon"] <= run_config["dp-target-epsilon"]
        # with most of the budget gone, the second run had to calibrate far more noise
        assert after["noise_multiplier"] > 2 * before["noise_multiplier"]


def test_client_without_its_ledger_refuses_to_train(tmp_path):
    """A node that lost its ledger mid-run must not start a fresh budget (or replay its noise): it refuses."""

    class LosingGrid(RestartingGrid):
        def restart(self, partition):
            super().restart(partition)
            for path in self.ledger_dir.glob("*.json"):
                path.unlink()

    run_config = tiny_run_config(tmp_path, "ffa_lora", "example", **{"min-clients-per-round": 2})
    grid = LosingGrid(run_config, tmp_path / "ledgers", restart_partition=1, after_group="0.0")
    with pytest.raises(RuntimeError, match="no privacy plan for this run in its ledger"):
        run_server(grid, run_config)


def test_failed_client_round_finishes_when_the_minimum_allows(tmp_path):
    """The one min-clients rule, as in process: at least min_clients_per_round of the round's clients finish."""
    run_config = tiny_run_config(tmp_path, "deer", None, **{"min-clients-per-round": 1})
    record = run_server(LocalGrid(run_config, tmp_path / "ledgers", fail={1: 1}), run_config)
    assert record["failed_clients"] == {"2": ["client_1"]}
    assert [entry["clients"] for entry in record["round_history"]] == [2, 1]
    saved = json.loads((tmp_path / "flower_out" / "federated_training.json").read_text())
    assert saved["failed_clients"] == {"2": ["client_1"]}


def test_failed_client_stops_the_run_without_a_minimum(tmp_path):
    run_config = tiny_run_config(tmp_path, "deer", None)  # min_clients_per_round unset: any failure stops the run
    with pytest.raises(RuntimeError, match=r"Round 2: a client failed and min_clients_per_round is not set.*crashed"):
        run_server(LocalGrid(run_config, tmp_path / "ledgers", fail={1: 1}), run_config)
    assert not (tmp_path / "flower_out" / "federated_training.json").exists()


class TamperingGrid(LocalGrid):
    """A client that reports less privacy spent than it ran (its report's last entry one step short)."""

    def pull_messages(self, message_ids):
        replies = super().pull_messages(message_ids)
        for reply in replies:
            if reply.has_error() or reply.metadata.message_type != "train":
                continue
            content = json.loads(reply.content["info"]["json"])
            history = content["privacy"]["client"]["history"]
            history[-1][2] -= 1
            content["privacy"]["client"]["steps"] -= 1
            reply.content["info"]["json"] = json.dumps(content)
        return replies


def test_the_server_refuses_a_privacy_report_that_disagrees_with_its_schedule(tmp_path):
    """The published epsilon is the server's, from what it planned and scheduled: a client report that undercounts
    its steps stops the run instead of reaching the record."""
    run_config = tiny_run_config(tmp_path, "ffa_lora", "example")
    with pytest.raises(ValueError, match="server planned and scheduled"):
        run_server(TamperingGrid(run_config, tmp_path / "ledgers"), run_config)
    assert not (tmp_path / "flower_out" / "federated_training.json").exists()


def test_the_server_refuses_a_plan_with_too_little_noise(tmp_path, monkeypatch):
    """A client whose plan would overspend the target for the steps the server planned is refused before training."""
    real = client_module.FlowerClient.plan

    def lax(self, config):
        reply = real(self, config)
        reply["noise_multiplier"] = reply["noise_multiplier"] / 4
        return reply

    monkeypatch.setattr(client_module.FlowerClient, "plan", lax)
    run_config = tiny_run_config(tmp_path, "ffa_lora", "example")
    with pytest.raises(ValueError, match="dp_target_epsilon"):
        run_server(LocalGrid(run_config, tmp_path / "ledgers"), run_config)


POOL_SIZE = 48


def pooled_task(run_config):
    """One pool of toy examples cut into num-partitions clients by position (k, k + K, ...); `extra-example` adds
    one new example to partition 0."""
    from datasets import concatenate_datasets

    from hf_fedlora.flower.tasks import tiny_bert

    base = tiny_bert({**run_config, "examples-per-client": POOL_SIZE})
    pool = base.load_client_data(0, 1)

    def load_client_data(partition_id: int, num_partitions: int):
        data = pool.select(range(partition_id, POOL_SIZE, num_partitions))
        if partition_id == 0 and run_config.get("extra-example"):
            data = concatenate_datasets([data, base.load_client_data(1, 1).select([0])])
        return data

    return type(base)(build_model=base.build_model, load_client_data=load_client_data)


def test_a_re_split_inherits_the_worst_earlier_spend_of_the_examples_each_client_holds(tmp_path):
    """Re-splitting the same pool from 2 to 4 clients, or adding one example to a client, never starts a fresh
    budget: each client's history starts from the spend of the ledgers that held its examples (issue: 3.99 reported
    where the composition was 4.47; one added example gave a fresh ledger)."""
    ledgers = tmp_path / "ledgers"
    common = {"task": "test_flower:pooled_task", "per-device-train-batch-size": 4, "dp-target-epsilon": 20.0}
    first_config = tiny_run_config(tmp_path, "ffa_lora", "example", **common)
    first = run_server(LocalGrid(first_config, ledgers), first_config)
    spent = {name: c["history"] for name, c in first["privacy"]["clients"].items()}

    resplit = tiny_run_config(tmp_path, "ffa_lora", "example", **common, **{"num-clients": 4})
    second = run_server(LocalGrid(resplit, ledgers), resplit)
    for index in range(4):  # positions k, k + 4, ...: every one was in the earlier client k mod 2
        client = second["privacy"]["clients"][f"client_{index}"]
        earlier = spent[f"client_{index % 2}"]
        assert client["history"][: len(earlier)] == earlier
        assert client["epsilon"] > first["privacy"]["clients"][f"client_{index % 2}"]["epsilon"]

    grown = tiny_run_config(tmp_path, "ffa_lora", "example", **common, **{"extra-example": True})
    third = run_server(LocalGrid(grown, ledgers), grown)
    client = third["privacy"]["clients"]["client_0"]
    before = [second["privacy"]["clients"][f"client_{k}"] for k in (0, 2)]  # where its examples were last
    assert client["steps"] >= max(c["steps"] for c in before) + 2 * 2  # + this run's 2 rounds x 2 steps
    assert client["epsilon"] > max(c["epsilon"] for c in before)


# ----------------------------------------------------------------------------------------------
# A real deployment on loopback: a SuperLink and two SuperNodes as separate processes.
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, ca_file: Path | None = None, timeout: float = 60) -> None:
    """Poll the SuperLink's /health endpoint (over TLS, checked against ca_file, when it has one)."""
    import ssl
    import urllib.request

    scheme, context = ("https", ssl.create_default_context(cafile=str(ca_file))) if ca_file else ("http", None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the SuperLink exited with {process.returncode} (see superlink.log)")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context):
                return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"the SuperLink did not become healthy on port {port} within {timeout}s")


def make_credentials(out_dir: Path, nodes: int) -> dict[str, Path]:
    """examples/flower/make_credentials.py, the script the README's secure deployment uses."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "flower" / "make_credentials.py"
    spec = importlib.util.spec_from_file_location("make_credentials", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_credentials(out_dir, ["127.0.0.1"], nodes)


def write_app(folder: Path, run_config: dict) -> None:
    config = "\n".join(f"{key} = {json.dumps(value)}" for key, value in run_config.items())
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [project]
            name = "hf-fedlora-flower-test"
            version = "0.1.0"
            description = "Tiny BERT across two SuperNodes (test)"
            license = "Apache-2.0"
            dependencies = []

            [tool.flwr.app]
            publisher = "hf-fedlora"

            [tool.flwr.app.components]
            serverapp = "hf_fedlora.flower.server:app"
            clientapp = "hf_fedlora.flower.client:app"

            [tool.flwr.app.config]
            """
        )
        + config
        + "\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not (Path(sys.executable).parent / "flower-superlink").exists(), reason="flwr's command-line tools are missing"
)
@pytest.mark.parametrize(
    "secure, secure_sum",
    [(True, False), (True, True), (False, False)],
    ids=["tls_authenticated_supernodes", "tls_secure_aggregation", "insecure_local"],
)
def test_loopback_deployment(tmp_path, secure, secure_sum):
    """flwr run on a SuperLink and two SuperNodes on 127.0.0.1; checks what the ServerApp wrote and each client's
    epsilon (never the exit code: `flwr run --stream` exits 0 when the ServerApp fails). Secure: TLS with the
    test's own CA, SuperNode authentication with registered node keys, and a third SuperNode whose key was never
    registered, which the SuperLink must refuse. Secure sum: also client-level DP with distributed noise, the
    uploads summed by secure aggregation across the two SuperNode processes (keys kept in each SuperNode's
    context state between messages). Insecure: the explicitly local variant."""
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "out"
    distributed = {"dp-noise-placement": "distributed", "dp-neighbouring-relation": "zero_out_one"}
    unit, extra = ("client", distributed) if secure_sum else ("example", {})
    run_config = tiny_run_config(tmp_path, "ffa_lora", unit, **{"output-dir": str(out), "wait-timeout": 120, **extra})
    del run_config["dp-secret-seed"]  # a real run: the secret streams come from OS entropy
    app_dir = tmp_path / "app"
    write_app(app_dir, run_config)
    link_port, node_ports = free_port(), [free_port(), free_port()]
    home = tmp_path / "flwr_home"
    home.mkdir()
    credentials = make_credentials(tmp_path / "credentials", nodes=NUM_CLIENTS + 1) if secure else {}
    # The CLI checks the SuperLink's certificate against the CA; insecure only when explicitly local.
    transport = f'root-certificates = "{credentials["ca.crt"]}"' if secure else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\n{transport}\n'
    )
    if secure:
        link_security = [
            *("--ssl-ca-certfile", str(credentials["ca.crt"]), "--ssl-certfile", str(credentials["server.pem"])),
            *("--ssl-keyfile", str(credentials["server.key"]), "--enable-supernode-auth"),
        ]
    else:
        link_security = ["--insecure"]

    def node_security(index: int) -> list[str]:
        if not secure:
            return ["--insecure"]
        key = credentials[f"node{index}.key"]
        return ["--root-certificates", str(credentials["ca.crt"]), "--auth-supernode-private-key", str(key)]

    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    processes: list[subprocess.Popen] = []
    logs = {}

    def start(name: str, command: list[str], **extra_env) -> subprocess.Popen:
        logs[name] = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed in the finally block
        process = subprocess.Popen(
            command, env={**env, **extra_env}, stdout=logs[name], stderr=subprocess.STDOUT, start_new_session=True
        )
        processes.append(process)
        return process

    started = time.monotonic()
    try:
        superlink = start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                *link_security,
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_healthy(link_port, superlink, credentials.get("ca.crt"))
        if secure:  # only the two federation members' public keys are registered
            for partition in range(NUM_CLIENTS):
                registered = subprocess.run(
                    [str(bin_dir / "flwr"), "supernode", "register", str(credentials[f"node{partition}.pub"]), "local"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert "registered successfully" in registered.stdout, registered.stdout + registered.stderr
            stranger = start(
                "stranger",
                [
                    str(bin_dir / "flower-supernode"),
                    *node_security(NUM_CLIENTS),  # a well-formed key on the right curve, never registered
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--node-config",
                    f'partition-id=0 num-partitions={NUM_CLIENTS} ledger-dir="{tmp_path / "stranger_ledger"}"',
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                ],
                FLWR_HOME=str(tmp_path / "stranger_home"),
            )
        for partition, port in enumerate(node_ports):
            node_home = tmp_path / f"node{partition}"
            node_home.mkdir()
            node_config = (
                f'partition-id={partition} num-partitions={NUM_CLIENTS} ledger-dir="{tmp_path / f"ledger{partition}"}"'
            )
            start(
                f"supernode{partition}",
                [
                    str(bin_dir / "flower-supernode"),
                    *node_security(partition),
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--node-config",
                    node_config,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                FLWR_HOME=str(node_home),
            )
        result = subprocess.run(
            [str(bin_dir / "flwr"), "run", str(app_dir), "local", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
        elapsed = time.monotonic() - started
        mode = "TLS, authenticated SuperNodes" if secure else "insecure"
        mode += ", secure aggregation with distributed noise" if secure_sum else ""
        print(f"loopback deployment ({mode}): {elapsed:.1f} s wall")
        if secure:  # the SuperLink refused the unregistered key: the stranger gave up, and never trained
            stranger.wait(timeout=60)
            stranger_log = (tmp_path / "stranger.log").read_text()
            assert stranger.returncode != 0 and "Failed to activate SuperNode" in stranger_log, stranger_log[-2000:]
            assert not (tmp_path / "stranger_ledger").exists()
        record_path = out / "federated_training.json"
        assert record_path.exists(), (
            f"no record written; flwr run said:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for handle in logs.values():
            handle.close()

    record = json.loads(record_path.read_text())
    assert record["rounds"] == 2 and record["driver"]["name"] == "flower"
    assert record["privacy"]["unit"] == unit and record["privacy"]["seeded"] is False
    adapter = saved_adapter(run_config, out)
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    if secure_sum:
        privacy = record["privacy"]
        assert privacy["noise_placement"] == "distributed" and privacy["secure_sum"].startswith("secure aggregation")
        assert 0 < privacy["epsilon"] <= run_config["dp-target-epsilon"] and privacy["rounds"] == 2
        return
    task = load_task(run_config)
    for partition in range(NUM_CLIENTS):
        client = record["privacy"]["clients"][f"client_{partition}"]
        assert 0 < client["epsilon"] <= run_config["dp-target-epsilon"]
        assert client["epsilon"] == pytest.approx(
            epsilon_from_history(client["history"], run_config["dp-target-delta"], "rdp"), rel=1e-9
        )
        ledger = PrivacyLedger.open(tmp_path / f"ledger{partition}", data_key(task.load_client_data(partition, 2)))
        assert ledger.history == client["history"]  # each client's own disk holds what the record reports
        assert client["steps"] == 2 * run_config["local-steps"]
