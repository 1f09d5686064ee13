"""Sharing a federated adapter: a model card that states its privacy guarantee, a narrow upload, the run's record.

The adapter itself is plain PEFT (it loads without hf_fedlora). What hf_fedlora adds is
the record of how it was trained (`federated_training.json`) and a card that says, in
words and numbers, what differential privacy it has (or that it has none), so nobody
has to guess from hyperparameters. Uploads list their files explicitly: a federated
run's output folder can hold things (per-client states, pickled arguments) that must
never leave the machine.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import math
import os
from collections.abc import Mapping, Sequence
from decimal import ROUND_CEILING, Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .methods import registered_config_classes
from .privacy.client_level import SIMULATED_SECURE_SUM

CARD_NAME = "README.md"
FEDERATED_RECORD_NAME = "federated_training.json"
TEMPLATE_NAME = "federated_lora.md"

# Hub task ids for PEFT task types whose pipeline is unambiguous.
PIPELINE_TAGS = {
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "CAUSAL_LM": "text-generation",
    "FEATURE_EXTRACTION": "feature-extraction",
}
AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}
# Transformers' speed metrics: not results, and not worth a column.
_NOT_RESULTS = ("_runtime", "_per_second", "_time")

# The method's own citation comes from its method class (hf_fedlora.methods); DP-SGD is cited under DP.
_DP_SGD_CITATION = """@inproceedings{abadi2016deep,
  title     = {Deep Learning with Differential Privacy},
  author    = {Abadi, Martin and Chu, Andy and Goodfellow, Ian and McMahan, H. Brendan and Mironov, Ilya and
               Talwar, Kunal and Zhang, Li},
  booktitle = {Proceedings of the 2016 ACM SIGSAC Conference on Computer and Communications Security (CCS)},
  pages     = {308--318},
  year      = {2016}
}"""
_DP_FEDAVG_CITATION = """@inproceedings{mcmahan2018learning,
  title     = {Learning Differentially Private Recurrent Language Models},
  author    = {McMahan, H. Brendan and Ramage, Daniel and Talwar, Kunal and Zhang, Li},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2018}
}"""


# ----------------------------------------------------------------------------------------
# Numbers as the card prints them (use these wherever the same guarantee is printed elsewhere)
# ----------------------------------------------------------------------------------------
def format_epsilon(epsilon: float) -> str:
    """Two decimals, rounded UP: a printed epsilon may overstate the accountant's value, never understate it."""
    if epsilon is None or math.isnan(epsilon):
        raise ValueError("epsilon is missing: the privacy report has no epsilon to print")
    if math.isinf(epsilon):
        return "∞"
    return f"{Decimal(repr(float(epsilon))).quantize(Decimal('0.01'), rounding=ROUND_CEILING):.2f}"


def format_delta(delta: float) -> str:
    """At most 3 significant digits, rounded up, in Python's `g` style: 1e-05, 2.5e-05, 0.0001."""
    value = Decimal(repr(float(delta)))
    if value <= 0:
        return f"{float(delta):g}"
    quantum = Decimal(1).scaleb(value.adjusted() - 2)
    return f"{float(value.quantize(quantum, rounding=ROUND_CEILING)):g}"


def _number(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if spec == "d" and isinstance(value, float):  # counts that went through JSON or numpy as floats
        return format(int(value), "d") if value.is_integer() else format(value, "g")
    return format(value, spec)


# ----------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------
def build_model_card(
    record: Mapping[str, Any],
    *,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: Sequence[str] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """A card from a run's federated record: the guarantee (or its absence) first, then method, federation, results.

    `repo_id` only fills the loading example; without it a placeholder is shown.
    """
    method = _method_name(record)
    privacy = record.get("privacy") or {}
    private = bool(privacy.get("private"))
    base_model = record.get("base_model") or None
    task_type = _task_type(record.get("task_type"))
    pipeline_tag = PIPELINE_TAGS.get(task_type or "")
    model_name = model_name or f"{method}-{_basename(base_model) or 'adapter'}"

    card_tags = ["hf_fedlora", "federated-learning", "lora", method]
    if private:
        card_tags.append("differential-privacy")
    card_tags += [tag for tag in (tags or []) if tag]
    if not private and "differential-privacy" in card_tags:
        raise ValueError("tag 'differential-privacy' given for a run with no differential-privacy guarantee")

    final_metrics = _eval_metrics(record.get("round_history") or [])
    eval_results = None
    if final_metrics and pipeline_tag is not None:
        dataset = dataset_name or "custom"
        eval_results = [
            EvalResult(
                task_type=pipeline_tag,
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=metric,
                metric_value=value,
                metric_name=f"eval {metric} (after round {final_metrics['round']})",
            )
            for metric, value in final_metrics["metrics"].items()
        ]
    card_data = ModelCardData(
        library_name="peft",
        base_model=base_model if _is_hub_id(base_model) else None,
        tags=card_tags,
        datasets=[dataset_name] if dataset_name else None,
        pipeline_tag=pipeline_tag,
        model_name=model_name,
        eval_results=eval_results,
    )
    context = _template_context(record, method, private, privacy, base_model, task_type, repo_id)
    return ModelCard.from_template(
        card_data, template_str=_template_text(), title=model_name, dataset_name=dataset_name, **context
    )


def save_model_card(
    output_dir: str | os.PathLike,
    record: Mapping[str, Any],
    *,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tags: Sequence[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """Write the card as `README.md` in `output_dir` (replacing PEFT's generic one); returns its path."""
    card = build_model_card(record, model_name=model_name, dataset_name=dataset_name, tags=tags, repo_id=repo_id)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(os.fspath(output_dir), CARD_NAME)
    card.save(path)
    return path


def _template_text() -> str:
    """The shipped template (package `hf_fedlora.model_cards`), else the repository's top-level model_cards/."""
    try:
        return (resources.files("hf_fedlora.model_cards") / TEMPLATE_NAME).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        path = Path(__file__).resolve().parents[1] / "model_cards" / TEMPLATE_NAME
        return path.read_text(encoding="utf-8")


def base_model_class(model: Any) -> str:
    """Import path of the model class under the adapter ("module.Class"), for the record and the card's loading code.

    Most runs use a Hub class (BertForSequenceClassification) that the Auto class rebuilds; an adapter trained on
    another class (e.g. hf_fedlora.models' mean pooling) must be loaded onto that class, so the card names it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return f"{type(base).__module__}.{type(base).__name__}"


def model_record(model: Any, config: Any) -> dict[str, Any]:
    """The record's description of the trained model (method, base, class, labels, task, LoRA shape): the same for
    the in-process trainer and the Flower server, so the card reads one format."""
    targets = config.target_modules
    return {
        "method": config.federated_dict(),
        "base_model": config.base_model_name_or_path,
        "base_model_class": base_model_class(model),
        "num_labels": getattr(getattr(model, "config", None), "num_labels", None),
        "task_type": str(getattr(config.task_type, "value", config.task_type)),
        "lora": {
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
        },
    }


def _load_context(record: Mapping[str, Any], task_type: str | None, base_model: str | None, repo_id: str | None):
    """The card's loading code: the recorded class for one of hf_fedlora.models (no Auto class builds it), else the
    Auto class of the task, as for any transformers model (custom Hub code included, with trust_remote_code)."""
    module, _, name = (record.get("base_model_class") or "").rpartition(".")
    custom = module.startswith("hf_fedlora.")
    return {
        "auto_class": name if custom else AUTO_CLASSES.get(task_type or "", "AutoModel"),
        "import_from": module if custom else "transformers",
        "custom_class": custom,
        "base_model": base_model or "<path or id of the base model>",
        "repo_id": repo_id or "<this adapter's repo id or local folder>",
        "num_labels": record.get("num_labels"),
    }


def _template_context(
    record: Mapping[str, Any],
    method: str,
    private: bool,
    privacy: Mapping[str, Any],
    base_model: str | None,
    task_type: str | None,
    repo_id: str | None,
) -> dict[str, Any]:
    """Everything the template prints, already formatted, so the template holds prose and layout only."""
    display, description, citation = _method_text(method)
    history = list(record.get("round_history") or [])
    lora = record.get("lora") or {}
    target_modules = lora.get("target_modules")
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = ", ".join(f"`{m}`" for m in target_modules)
    citations = [citation] if citation else []
    if private:
        citations.append(_DP_FEDAVG_CITATION if privacy.get("unit") == "client" else _DP_SGD_CITATION)
    citations.append(_library_citation())
    return {
        "private": private,
        "dp": _privacy_context(privacy) if private else None,
        "method": {
            "name": method,
            "display": display,
            "description": description,
            "init_seed": (record.get("method") or {}).get("init_seed"),
            "settings": ", ".join(
                f"{key} = {json.dumps(value)}"
                for key, value in (record.get("method") or {}).items()
                if key not in ("method", "init_seed")
            ),
        },
        "base_model_name": base_model,
        "task_type": task_type,
        "lora": {"r": lora.get("r"), "lora_alpha": lora.get("lora_alpha"), "target_modules": target_modules},
        "federation": _federation_context(record),
        "results": _results_table(history, private, privacy.get("unit")),
        "has_eval": _eval_metrics(history) is not None,
        "load": _load_context(record, task_type, base_model, repo_id),
        "citations": citations,
        "record_name": FEDERATED_RECORD_NAME,
        "unprotected_published": bool(record.get("unprotected_statistics_published")),
        "continued": _continued_context(record.get("continued_from")),
        "selection": _selection_text(record),
    }


def _method_text(method: str) -> tuple[str, str, str | None]:
    """(display name, the card's sentence, BibTeX or None) from the registered method class; a method this
    hf_fedlora does not know (a record from another version) is named as recorded, without a citation."""
    for config_cls in registered_config_classes():
        if config_cls.method_class.name == method:
            cls = config_cls.method_class
            return cls.display_name, cls.description, cls.citation
    return method, f"The federated LoRA method `{method}`.", None


def _continued_context(continued: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How this adapter's earlier training enters the guarantee (None for an adapter trained from scratch)."""
    if not continued:
        return None
    epsilon = continued.get("epsilon")
    return {
        "recorded": bool(continued.get("recorded")),
        "new_budget": bool(continued.get("new_privacy_budget")),
        "rounds": continued.get("rounds"),
        "epsilon": format_epsilon(epsilon) if epsilon is not None else None,
        "private": bool(continued.get("private")),
        "worst_case": continued.get("composed") == "worst earlier client",
    }


def _privacy_context(privacy: Mapping[str, Any]) -> dict[str, Any]:
    unit = privacy.get("unit")
    if unit not in ("example", "client"):
        raise ValueError(f"Unknown privacy unit {unit!r}: the card will not guess what the guarantee protects")
    clients = privacy.get("clients") or {}
    target = privacy.get("target_epsilon")
    context = {
        "epsilon": format_epsilon(privacy["epsilon"]),
        "delta": format_delta(privacy["delta"]),
        "unit": unit,
        "target_epsilon": _number(target, "g"),
        "accountant": str(privacy.get("accountant", "unknown")).upper(),
        "clip_norm": repr(float(privacy["clip_norm"])) if privacy.get("clip_norm") is not None else "-",
        "clipping": privacy.get("clipping", "flat"),  # records written before per-layer clipping existed: flat
        "calibration": privacy.get("noise_calibration"),
        "seeded": bool(privacy.get("seeded")),
        "num_clients": len(clients),
        "clients": [
            {
                "name": name,
                "examples": _number(c.get("num_examples"), "d"),
                "noise_multiplier": _number(c.get("noise_multiplier")),
                "sample_rate": _number(c.get("sample_rate")),
                "steps": _number(c.get("steps"), "d"),
                "epsilon": format_epsilon(c["epsilon"]),
            }
            for name, c in clients.items()
        ],
    }
    if unit == "client":  # DP-FedAvg: one mechanism for the whole federation
        context.update(
            relation=privacy.get("neighbouring_relation", "add_or_remove_one"),
            noise_multiplier=_number(privacy.get("noise_multiplier")),
            sample_rate=_number(privacy.get("sample_rate")),
            sample_rate_is_one=privacy.get("sample_rate") == 1,
            expected_clients=_number(privacy.get("expected_clients_per_round"), "g"),
            releases_per_round=int(privacy.get("releases_per_round") or 1),
            rounds=_number(privacy.get("rounds"), "d"),
            distributed=_distributed_context(privacy),
        )
    return context


def _distributed_context(privacy: Mapping[str, Any]) -> dict[str, Any] | None:
    """The distributed-noise plan as the card prints it, or None under central noise."""
    plan = privacy.get("distributed_noise")
    if privacy.get("noise_placement") != "distributed" or not isinstance(plan, Mapping):
        return None
    return {
        "bits": int(plan["bits"]),
        "granularity": _number(plan["granularity"]),
        "dimension": int(plan["dimension"]),
        "min_shares": int(plan["min_shares"]),
        "max_shares": int(plan["max_shares"]),
        "simulated": privacy.get("secure_sum") == SIMULATED_SECURE_SUM,
        "secure_sum": privacy.get("secure_sum"),
    }


def _selection_text(record: Mapping[str, Any]) -> str:
    """How the settings were chosen: tuning on the private training data is outside epsilon (Papernot and Steinke,
    2022), so the card says what the record knows of it."""
    said = record.get("hyperparameter_selection")
    if said:
        return f"How the settings were chosen: {said}"
    return (
        "How the settings (learning rate, batch, rounds, ...) were chosen is not recorded: if they were tuned with "
        "runs on these clients' training data, that tuning is outside ε (Papernot and Steinke, 2022)."
    )


def _federation_context(record: Mapping[str, Any]) -> dict[str, Any]:
    partition = dict(record.get("partition") or {})
    scheme = partition.pop("scheme", "unknown")
    sizes = record.get("client_sizes") or {}
    histograms = record.get("client_label_histograms") or {}
    labels = sorted({label for h in histograms.values() for label in h}, key=_label_key)
    local_steps, local_epochs = record.get("local_steps"), record.get("local_epochs")
    if local_steps is not None:
        local_work = f"{local_steps} local steps per client per round"
    else:
        epochs = local_epochs if local_epochs is not None else 1
        local_work = f"{_number(epochs)} local epoch(s) per client per round"
    weights = record.get("aggregation_weights")
    weights_text = {
        "num_examples": "proportional to each client's number of examples (renormalised over the round's clients)",
        "uniform": "uniform over the round's clients",
    }.get(weights, str(weights))
    return {
        "num_clients": record.get("num_clients", len(sizes)),
        "clients_per_round": record.get("clients_per_round"),
        "rounds": record.get("rounds"),
        "local_work": local_work,
        "batch_size": record.get("batch_size"),
        "learning_rate": _number(record.get("learning_rate")),
        "aggregation_weights": weights_text,
        "secure_aggregation": record.get("secure_aggregation"),
        "partition_scheme": scheme,
        "partition_params": ", ".join(f"{k} = {json.dumps(v)}" for k, v in partition.items()),
        "labels": labels,
        "clients": [
            {
                "name": name,
                "examples": size,
                "histogram": [(histograms.get(name) or {}).get(label, 0) for label in labels],
            }
            for name, size in sizes.items()
        ],
    }


def _results_table(history: Sequence[Mapping[str, Any]], private: bool, unit: str | None = None) -> dict[str, Any]:
    """Per-round rows: round, clients, train loss, epsilon (private runs only), then any eval metrics."""
    metrics = sorted({key for entry in history for key in entry if _is_eval_metric(key)})
    losses = any("train_loss" in entry for entry in history)  # under DP only when published on request
    counts = any("clients" in entry for entry in history)  # never under client-level DP: who took part is secret
    header = ["Round"] + (["Clients"] if counts else []) + (["Train loss"] if losses else [])
    epsilon = "ε" if unit == "client" else "ε (max over clients)"
    header += ([epsilon] if private else []) + [key.replace("_", " ") for key in metrics]
    rows = []
    for entry in history:
        row = [_number(entry.get("round"), "d")] + ([_number(entry.get("clients"), "d")] if counts else [])
        if losses:
            row.append(_number(entry.get("train_loss"), ".4f"))
        if private:
            row.append(format_epsilon(entry["epsilon"]) if entry.get("epsilon") is not None else "-")
        row += [_number(entry.get(key), ".4f") for key in metrics]
        rows.append(row)
    return {"header": header, "rows": rows, "has_loss": losses, "fixed_columns": len(header) - len(metrics)}


def _eval_metrics(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last evaluated round's metrics, names without the `eval_` prefix (for the card's eval results)."""
    for entry in reversed(history):
        metrics = {
            key.removeprefix("eval_"): float(value)
            for key, value in entry.items()
            if _is_eval_metric(key) and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if metrics:
            return {"round": entry.get("round"), "metrics": metrics}
    return None


def _is_eval_metric(key: str) -> bool:
    return key.startswith("eval_") and not key.endswith(_NOT_RESULTS)


def _method_name(record: Mapping[str, Any]) -> str:
    method = record.get("method")
    name = method.get("method") if isinstance(method, Mapping) else method
    if not name:
        raise ValueError("The record names no method: was it written by hf_fedlora's FederatedTrainer?")
    return str(name)


def _task_type(task_type: Any) -> str | None:
    if task_type is None:
        return None
    return str(getattr(task_type, "value", task_type))


def _basename(name: str | None) -> str | None:
    return name.rstrip("/\\").replace("\\", "/").split("/")[-1] if name else None


def _is_hub_id(name: str | None) -> bool:
    """Only Hub ids go into `base_model` metadata: the Hub rejects cards whose base_model is a local path."""
    if not name or os.path.isabs(name) or name.startswith(".") or os.path.isdir(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _label_key(label: str) -> tuple[int, Any]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def _library_citation() -> str:
    try:
        version = importlib.metadata.version("hf-fedlora")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return (
        "@software{hf_fedlora,\n"
        "  title   = {hf\\_fedlora: Federated, differentially private {LoRA} fine-tuning for the Hugging Face stack},\n"
        f"  version = {{{version}}}\n"
        "}"
    )


# ----------------------------------------------------------------------------------------
# Upload and download
# ----------------------------------------------------------------------------------------
def upload_files(
    folder: str | os.PathLike,
    files: Sequence[str],
    *,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload federated LoRA adapter with hf_fedlora",
    revision: str | None = None,
):
    """Create the repo if needed and upload exactly `files` (plain files directly in `folder`), nothing else.

    An explicit list rather than the whole folder: a federated output folder may hold client
    states or pickled arguments that must not be published. Everything is checked before any
    call to the Hub. Returns what `HfApi.upload_folder` returns (a `CommitInfo`).
    """
    if isinstance(files, str):
        raise TypeError("files must be a list of file names, not a single string")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder")
    names = list(dict.fromkeys(files))
    if not names:
        raise ValueError("No files to upload")
    nested = [name for name in names if not name or os.path.basename(name) != name or name in (".", "..")]
    if nested:
        raise ValueError(f"Only plain file names directly in {folder!r} may be uploaded, got {nested}")
    missing = [name for name in names if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"Files to upload are missing from {folder!r}: {missing}")
    paths = {name: os.path.join(folder, name) for name in names}
    not_plain = [name for name, path in paths.items() if os.path.islink(path) or not os.path.isfile(path)]
    if not_plain:
        raise ValueError(f"Only plain files may be uploaded (no folders or links), got {not_plain}")

    api = HfApi(token=token)  # at call time: one client per upload, with this call's token
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        allow_patterns=[glob.escape(name) for name in names],  # a name like "a[1].json" must match only itself
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
    )


def load_federated_record(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The federated record saved beside an adapter: from a local folder, else from the Hub (or its local cache)."""
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        file = os.path.join(path, FEDERATED_RECORD_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"{path!r} has no {FEDERATED_RECORD_NAME}: it was not saved by hf_fedlora's FederatedTrainer"
            )
    else:
        try:
            file = hf_hub_download(
                path, FEDERATED_RECORD_NAME, revision=revision, token=token, cache_dir=cache_dir, repo_type="model"
            )
        except HFValidationError as error:
            raise FileNotFoundError(f"{path!r} is neither a local folder nor a Hub repo id") from error
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"{path!r} has no {FEDERATED_RECORD_NAME}: it was not saved by hf_fedlora's FederatedTrainer "
                f"(or it is not in the local cache while offline)"
            ) from error
    with open(file, encoding="utf-8") as handle:
        record = json.load(handle)
    if not isinstance(record, dict) or "method" not in record or "privacy" not in record:
        raise ValueError(f"{file} is not a federated record written by hf_fedlora's FederatedTrainer")
    return record
