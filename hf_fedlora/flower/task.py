"""What a Flower run trains: the model, the arguments and one client's data, built the same way everywhere.

The run config (`[tool.flwr.app.config]`, or `flwr run ... --run-config`) names a task factory,
`task = "package.module:function"`, called with the run config on the server and on every client.
Every other run-config key whose name (with `-` read as `_`) is a `FederatedTrainingArguments` field
sets that field (`num-server-rounds` sets `num_rounds`; "none" or "" sets None), so the server and the
clients agree on one set of arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from peft import PeftModel

from ..training_args import FederatedTrainingArguments

# Keys only the Flower apps read (the rest of the run config goes to FederatedTrainingArguments).
FLOWER_KEYS = (
    "task",
    "output-dir",
    "num-clients",
    "round-timeout",
    "wait-timeout",
)
RENAMED = {"num-server-rounds": "num_rounds"}


@dataclass
class FlowerTask:
    """Builders of one run's pieces; each is called in the process that needs it (clients never build others' data)."""

    build_model: Callable[[], PeftModel]  # a fresh base model with its hf_fedlora adapter
    load_client_data: Callable[[int, int], Dataset]  # (partition id, number of partitions) -> that client's examples
    processing_class: Any = None  # e.g. a tokenizer: pads batches, and is saved with the adapter
    data_collator: Any = None


def load_task(run_config: Mapping[str, Any]) -> FlowerTask:
    """Import and call the run config's `task` factory ("module:function")."""
    spec = run_config.get("task")
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"run config 'task' must name a task factory as 'module:function' (e.g. "
            f"'hf_fedlora.flower.tasks:minilm_tweets'), got {spec!r}"
        )
    module, function = spec.split(":", 1)
    factory = getattr(importlib.import_module(module), function)
    task = factory(run_config)
    if not isinstance(task, FlowerTask):
        raise ValueError(f"task factory {spec!r} must return a FlowerTask, got {type(task).__name__}")
    return task


def training_args_from_run_config(run_config: Mapping[str, Any], output_dir: str, **overrides: Any):
    """`FederatedTrainingArguments` from the run config's keys (see the module docstring); overrides win."""
    fields = {f.name for f in dataclasses.fields(FederatedTrainingArguments)}
    kwargs: dict[str, Any] = {
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
    }
    for key, value in run_config.items():
        if key in FLOWER_KEYS:
            continue
        name = RENAMED.get(key, key.replace("-", "_"))
        if name not in fields:
            continue
        kwargs[name] = None if isinstance(value, str) and value.lower() in ("", "none") else value
    kwargs.update(output_dir=output_dir, **overrides)
    return FederatedTrainingArguments(**kwargs)
