"""examples/instruction_tuning/run_instruction_tuning.py end to end on a tiny Llama saved to disk (no Hub)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from test_instruction_tuning import chat_data, tiny_causal_lm, tiny_tokenizer

from hf_fedlora.hub import FEDERATED_RECORD_NAME

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "instruction_tuning" / "run_instruction_tuning.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("run_instruction_tuning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run_instruction_tuning = _load_script()


def write_jsonl(path: Path, n: int, seed: int) -> None:
    """GSM8K layout (question / answer ending in '#### n')."""
    with open(path, "w") as handle:
        for messages in chat_data(n, seed=seed)["messages"]:
            handle.write(json.dumps({"question": messages[0]["content"], "answer": messages[1]["content"]}) + "\n")


def test_gsm8k_style_local_files_train_under_dp_evaluate_by_exact_match_and_load_in_plain_peft(tmp_path):
    model_dir = tmp_path / "base"
    tiny_causal_lm("llama", adapter=False).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    write_jsonl(tmp_path / "train.jsonl", 40, seed=0)
    write_jsonl(tmp_path / "test.jsonl", 6, seed=1)
    out = tmp_path / "out"
    trainer = run_instruction_tuning.main(
        [
            "--model_name_or_path", str(model_dir),
            "--train_file", str(tmp_path / "train.jsonl"),
            "--validation_file", str(tmp_path / "test.jsonl"),
            "--method", "deer",
            "--lora_r", "4",
            "--lora_target_modules", "q_proj,v_proj",
            "--max_new_tokens", "6",
            "--num_clients", "2",
            "--num_rounds", "1",
            "--local_steps", "2",
            "--per_device_train_batch_size", "4",
            "--dp_noise_multiplier", "1.0",
            "--dp_accountant", "rdp",
            "--use_cpu",
            "--report_to", "none",
            "--disable_tqdm", "True",
            "--save_strategy", "no",
            "--output_dir", str(out),
        ]
    )  # fmt: skip
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_mode"] == "exact_match" and results["num_eval_examples"] == 6
    for key in ("before_exact_match", "eval_exact_match", "before_loss", "eval_loss", "eval_perplexity"):
        assert key in results
    assert results["epsilon"] == trainer.privacy_report()["epsilon"] > 0 and results["dp_unit"] == "example"
    assert results["plain_peft_generations_match"] is True
    record = json.loads((out / FEDERATED_RECORD_NAME).read_text())
    assert record["method"]["method"] == "deer" and record["base_model"] == str(model_dir)

    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama", adapter=False), str(out))
    ids = torch.tensor([[4, 10, 12, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)
