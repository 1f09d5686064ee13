"""A saved federated adapter is a plain PEFT LoRA: it loads without hf_fedlora, silently, to the same logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftType, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import SEQ_LEN, VOCAB, fed_args, tiny_bert, toy_dataset

from hf_fedlora import FederatedTrainer, FedLoraConfig, FFALoraConfig

# Runs in a fresh interpreter: only torch, transformers and peft (plus the standard library and safetensors to
# hand the logits back). Any warning or log record about config keys peft/transformers do not know, weights they
# did not find or did not use, makes it exit non-zero.
LOADER_SCRIPT = r"""
import logging
import re
import sys
import warnings

base_dir, adapter_dir, batch_file, logits_file = sys.argv[1:5]

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

SUSPICIOUS = re.compile(
    r"unexpected|unknown|ignored|missing|load report|not initiali[sz]ed|newly initiali[sz]ed|not used|unused",
    re.IGNORECASE,
)

class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"[log {record.name}] {record.getMessage()}")

collector = Collect()
for name in ("", "transformers", "peft", "safetensors", "huggingface_hub"):
    logging.getLogger(name).addHandler(collector)

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    batch = load_file(batch_file)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

messages = [f"[{w.category.__name__}] {w.message}" for w in caught] + collector.messages
for message in messages:
    print(message, file=sys.stderr)
bad = [m for m in messages if SUSPICIOUS.search(m)]
assert not bad, f"loading the adapter in plain peft warned: {bad}"
assert "hf_fedlora" not in sys.modules, "the plain-peft loader imported hf_fedlora"
assert type(model.peft_config["default"]).__name__ == "LoraConfig", type(model.peft_config["default"])
save_file({"logits": logits.contiguous()}, logits_file)
print("LOADED_OK")
"""

LORA_KWARGS = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}


def _fixed_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(1, VOCAB, (6, SEQ_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3:, SEQ_LEN - 2 :] = 0  # some padding, so the mask takes part
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits
    return out.detach().cpu()


def _load_in_plain_peft(
    tmp_path: Path, base_dir: Path, adapter_dir: Path | str, batch_file: Path, tag: str, extra_env=None
):
    """Run LOADER_SCRIPT in a subprocess; return (CompletedProcess, path the logits go to).

    `adapter_dir` may be a Hub repo id, resolved from the cache named by HF_HUB_CACHE in `extra_env`.
    """
    script = tmp_path / "load_plain_peft.py"
    script.write_text(LOADER_SCRIPT)
    logits_file = tmp_path / f"plain_logits_{tag}.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(extra_env or {}))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, str(script), str(base_dir), str(adapter_dir), str(batch_file), str(logits_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, logits_file


def _train_and_save(tmp_path: Path, config_cls, private: bool):
    """Save the base, train 2 rounds, save the adapter; return (trainer, base logits, trained logits, dirs)."""
    batch = _fixed_batch()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_bert(seed=0)
    base.save_pretrained(base_dir)  # before get_peft_model, which changes the model in place
    base_logits = _logits(base, batch)
    model = get_peft_model(base, config_cls(**LORA_KWARGS))
    dp = {"dp_target_epsilon": 8.0, "dp_clip_norm": 1.0} if private else {}
    args = fed_args(tmp_path / "run", num_rounds=2, local_steps=2, learning_rate=5e-2, **dp)
    trainer = FederatedTrainer(model=model, args=args, train_dataset=toy_dataset(n=64))
    trainer.train()
    trainer.save_model(str(adapter_dir))
    trained_logits = _logits(trainer.model, batch)
    batch_file = tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in batch.items()}, str(batch_file))
    return trainer, base_logits, trained_logits, base_dir, adapter_dir, batch_file


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config_cls", "method_name", "private"),
    [(FFALoraConfig, "ffa_lora", True), (FedLoraConfig, "lora", False)],
    ids=["ffa_lora-dp", "lora-non_private"],
)
def test_saved_adapter_loads_in_plain_peft_with_same_logits(tmp_path, config_cls, method_name, private):
    """A trained adapter saved by FederatedTrainer loads in plain peft, without hf_fedlora or warnings, same logits."""
    trainer, base_logits, trained_logits, base_dir, adapter_dir, batch_file = _train_and_save(
        tmp_path, config_cls, private
    )

    # Training changed the model, so matching logits below cannot come from a no-op save.
    assert not torch.allclose(trained_logits, base_logits, atol=1e-4)

    # The folder: safetensors weights, a plain LoRA config, the federated record; nothing pickled.
    files = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "federated_training.json"} <= files
    assert not [n for n in files if n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))], files
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b), "lora_B was saved untrained (all zeros)"
    assert any("classifier" in k for k in weights), sorted(weights)

    raw_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert raw_config["peft_type"] == "LORA"
    assert "init_seed" not in raw_config
    config = PeftConfig.from_pretrained(str(adapter_dir))
    assert type(config).__name__ == "LoraConfig" and config.peft_type == PeftType.LORA
    assert not isinstance(config, FedLoraConfig)

    record = json.loads((adapter_dir / "federated_training.json").read_text())
    assert record["method"]["method"] == method_name
    assert record["method"]["init_seed"] == 0
    assert record["rounds"] == 2
    epsilon = trainer.privacy_report()["epsilon"]
    assert record["privacy"]["epsilon"] == epsilon
    if private:
        assert record["privacy"]["private"] is True
        assert math.isfinite(epsilon) and 0 < epsilon <= 8.0 + 1e-6
    else:
        assert record["privacy"]["private"] is False and epsilon is None

    result, logits_file = _load_in_plain_peft(tmp_path, base_dir, adapter_dir, batch_file, method_name)
    assert result.returncode == 0 and "LOADED_OK" in result.stdout, result.stderr[-4000:]
    plain_logits = load_file(str(logits_file))["logits"]
    assert plain_logits.shape == trained_logits.shape
    assert torch.allclose(plain_logits, trained_logits, rtol=0, atol=1e-6), (plain_logits - trained_logits).abs().max()


def test_loader_check_fails_on_unknown_config_keys(tmp_path):
    """The plain-peft check is sensitive: an adapter_config.json with a federated key left in makes it fail."""
    batch = _fixed_batch()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    base = tiny_bert(seed=0)
    base.save_pretrained(base_dir)
    model = get_peft_model(base, FFALoraConfig(**LORA_KWARGS))
    model.save_pretrained(str(adapter_dir))
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_seed"] = 0  # what to_dict must leave out
    config_path.write_text(json.dumps(config))
    batch_file = tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in batch.items()}, str(batch_file))

    result, _ = _load_in_plain_peft(tmp_path, base_dir, adapter_dir, batch_file, "tampered")
    assert result.returncode != 0 and "LOADED_OK" not in result.stdout
    assert "init_seed" in result.stderr and "loading the adapter in plain peft warned" in result.stderr
