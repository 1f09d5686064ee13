"""`hf-fedlora demo`: the comparison's table, plots and adapters; DEeR's equal budget; bad arguments fail early.

Runs the real MiniLM on a few hundred offline tweets for one round with a fixed noise multiplier (no
calibration), so each run takes seconds.
"""

import json
import warnings

import matplotlib.axes
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from toy_method import TOY_CITATION, registered_toy

from hf_fedlora import FederatedTrainingArguments, cli, demo_task
from hf_fedlora.comparison import DEFAULT_LEARNING_RATES, method_names
from hf_fedlora.hub import format_delta, format_epsilon

FAST = [
    "--max_train_examples", "300", "--max_eval_examples", "32", "--num_rounds", "1", "--num_clients", "2",
    "--partition", "iid", "--per_device_train_batch_size", "8", "--dp_noise_multiplier", "1.0",
    "--disable_tqdm", "true",
]  # fmt: skip


def adapter_bytes(folder, skip: str | None = None) -> int:
    """Bytes of the saved adapter's tensors (optionally without those whose name contains `skip`)."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if skip is None or skip not in name)


def test_compare_writes_table_plot_and_one_adapter_per_method(tmp_path, monkeypatch):
    lines = []
    plot = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        lines.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    cli.run_demo([*FAST, "--compare", "lora,ffa_lora", "--output_dir", str(tmp_path)])

    table = json.loads((tmp_path / "results.json").read_text())
    markdown = (tmp_path / "results.md").read_text()
    assert [row["method"] for row in table["rows"]] == ["lora", "ffa_lora"]
    for row in table["rows"]:
        folder = tmp_path / row["method"]
        assert (folder / "README.md").is_file() and (folder / "adapter_model.safetensors").is_file()
        privacy = json.loads((folder / "federated_training.json").read_text())["privacy"]
        assert (row["epsilon"], row["delta"], row["unit"]) == (privacy["epsilon"], privacy["delta"], "example")
        assert {c["noise_multiplier"] for c in privacy["clients"].values()} == {1.0}
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {row['method']} |"))
        assert f"| {format_epsilon(privacy['epsilon'])} | {format_delta(privacy['delta'])} | example |" in line
        assert row["learning_rate"] == DEFAULT_LEARNING_RATES[row["method"]].value
        assert [r for r, _ in row["accuracy_per_round"]] == [0, 1]
    # one round: LoRA sends A, B and the head; FFA-LoRA the same minus A (sizes from the saved adapters)
    lora, ffa = table["rows"]
    assert lora["mb_uploaded_per_client"] * 1e6 == pytest.approx(adapter_bytes(tmp_path / "lora"))
    assert ffa["mb_uploaded_per_client"] * 1e6 == pytest.approx(adapter_bytes(tmp_path / "ffa_lora", skip="lora_A"))

    with Image.open(tmp_path / "accuracy_per_round.png") as image:
        image.verify()
    assert [label.split()[0] for label in lines] == ["lora", "ffa_lora"]  # one line per method
    assert not (tmp_path / "accuracy_vs_epsilon.png").exists()  # one budget: nothing to plot against


def test_deer_splits_its_local_steps_between_its_sub_rounds(tmp_path):
    cli.run_demo([*FAST, "--method", "deer", "--local_steps", "2", "--output_dir", str(tmp_path)])
    row = json.loads((tmp_path / "results.json").read_text())["rows"][0]
    assert (row["method"], row["sub_rounds_per_round"], row["local_steps_per_sub_round"]) == ("deer", 2, 1)
    privacy = json.loads((tmp_path / "deer" / "federated_training.json").read_text())["privacy"]
    # the same noisy steps as a one-sub-round method with --local_steps 2
    assert {c["steps"] for c in privacy["clients"].values()} == {2}


@pytest.mark.parametrize("hub_offline", ["1", None])
def test_the_demo_raises_no_warning_offline(tmp_path, monkeypatch, hub_offline):
    """Offline, PEFT's check of the base model's vocabulary at save warns one way with HF_HUB_OFFLINE set and
    another without it (a failed Hub lookup); `hf-fedlora demo` run directly, not via scripts/demo.sh, must show
    neither. FAST's own settings (a 300-tweet federation) stay clear of the privacy engine's delta warning."""
    if hub_offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.run_demo([*FAST, "--method", "ffa_lora", "--output_dir", str(tmp_path)])
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "nope"], "'nope' is not a registered method"),
        (["--compare", "lora,nope"], "unknown methods ['nope']"),
        (["--method", "lora", "--compare"], "not both"),
        (["--compare", "--learning_rate", "0.1"], "--learning_rate sets one rate"),
        (["--epsilons", "1,3", "--dp_target_epsilon", "2"], "drop --dp_target_epsilon"),
        (["--method", "deer", "--local_steps", "3"], "does not split evenly"),
        (["--dropout", "1"], "not a probability"),
        (["--lora_layers", "2", "6"], "must name distinct MiniLM layers among 0-5"),
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded_or_trained(tmp_path, monkeypatch, capsys, flags, message):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo loaded data for a command it should have refused")

    monkeypatch.setattr(cli, "load_tweet_task", must_not_run)
    output_dir = tmp_path / "out"
    assert cli.main(["demo", *flags, "--output_dir", str(output_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


def test_an_unknown_pooling_is_refused_by_the_parser_before_anything_is_loaded(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_tweet_task", lambda *a, **k: pytest.fail("the demo loaded data"))
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_demo_args(["--pooling", "cls"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'cls'" in capsys.readouterr().err


def test_the_demo_takes_per_layer_clipping_and_says_so():
    _, args, plan = cli.parse_demo_args([])
    assert args.dp_clipping == "flat" and "per_layer" not in cli._privacy_text(args, plan)
    _, args, plan = cli.parse_demo_args(["--dp_clipping", "per_layer"])
    assert args.dp_clipping == "per_layer"
    assert "clip norm 1.0 (per_layer)" in cli._privacy_text(args, plan)


def test_plan_defaults_and_overrides():
    _, args, plan = cli.parse_demo_args([])
    assert (plan.methods, plan.budgets, args.dp_unit) == (["ffa_lora"], [8.0], "example")
    from hf_fedlora.offline_assets import load_tweet_sentiment

    # below the privacy engine's "not far below 1/N" warning threshold for the demo's federation
    assert args.dp_target_delta <= 0.1 / len(load_tweet_sentiment()["train"])
    assert cli.parse_demo_args(["--compare"])[2].methods == method_names()
    _, _, plan = cli.parse_demo_args(["--method", "deer", "--learning_rate", "0.1", "--epsilons", "1,3,none"])
    assert (plan.learning_rates["deer"].value, plan.budgets) == (0.1, [1.0, 3.0, None])


def test_a_registered_method_without_a_tuned_rate_runs_at_the_default_rate_and_says_so(tmp_path):
    """The demo plans a method registered from outside: at FederatedTrainingArguments' default learning rate,
    marked untuned in the plan and in the notes written beside the results; --compare includes it."""
    default_rate = FederatedTrainingArguments(output_dir=str(tmp_path)).learning_rate
    with registered_toy():
        demo, args, plan = cli.parse_demo_args(["--method", "toy_lora"])
        assert cli.parse_demo_args(["--compare"])[2].methods[-1] == "toy_lora"
    assert plan.methods == ["toy_lora"]
    rate = plan.learning_rates["toy_lora"]
    assert (rate.value, rate.tuned) == (default_rate, False)
    notes = " ".join(cli._notes(demo, args, plan, {}))
    assert f"toy_lora {default_rate:g} from FederatedTrainingArguments' default learning_rate, not tuned" in notes
    _, _, plan = cli.parse_demo_args(["--method", "lora"])
    assert plan.learning_rates["lora"].tuned  # the built-in methods keep their tuned recipe rates


def test_the_demo_runs_a_registered_method_and_its_card_and_table_say_what_it_is(tmp_path, capsys):
    """End to end: the toy method trains, the first screen and results.json say its rate was not tuned, and its
    model card names it and cites its paper, all read from its method class."""
    with registered_toy():
        cli.run_demo([*FAST, "--method", "toy_lora", "--output_dir", str(tmp_path)])
    default_rate = FederatedTrainingArguments(output_dir=str(tmp_path)).learning_rate
    assert f"toy_lora {default_rate:g} (not tuned for this method" in capsys.readouterr().out
    [row] = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert (row["method"], row["learning_rate_tuned"]) == ("toy_lora", False)
    assert "not tuned" in row["learning_rate_source"]
    card = (tmp_path / "toy_lora" / "README.md").read_text()
    assert "**Toy-LoRA** (`toy_lora`)" in card and TOY_CITATION in card


@pytest.mark.parametrize("flags, expected", [([], {0.0}), (["--dropout", "0.1"], {0.1})])
def test_the_recipe_trains_minilm_without_dropout_and_the_flag_restores_it(tmp_path, monkeypatch, flags, expected):
    """The dropout of the model the demo trains (not only the helper's): 0 by default, the flag's value if given."""
    built = []

    def recording_classifier(*args, **kwargs):
        built.append(minilm_classifier(*args, **kwargs))
        return built[-1]

    minilm_classifier = demo_task.minilm_classifier
    monkeypatch.setattr(cli, "minilm_classifier", recording_classifier)
    cli.run_demo([*FAST, *flags, "--method", "ffa_lora", "--output_dir", str(tmp_path)])
    assert len(built) == 1
    assert {m.p for m in built[0].modules() if isinstance(m, torch.nn.Dropout)} == expected


@pytest.mark.parametrize(
    "flags, model_class, ratio",
    [
        ([], "hf_fedlora.models.mean_pooling.BertMeanPoolingForSequenceClassification", 0.1),
        (["--pooling", "pooler"], "transformers.models.bert.modeling_bert.BertForSequenceClassification", 0.1),
    ],
)
def test_the_recipe_reads_the_mean_over_tokens_and_trains_ffa_lora_b_at_a_tenth(tmp_path, flags, model_class, ratio):
    """The trained model's class and FFA-LoRA's lr_ratio_b, as the run's record (and so its card) states them."""
    cli.run_demo([*FAST, *flags, "--method", "ffa_lora", "--output_dir", str(tmp_path)])
    record = json.loads((tmp_path / "ffa_lora" / "federated_training.json").read_text())
    assert record["base_model_class"] == model_class
    assert record["method"]["lr_ratio_b"] == ratio


def test_every_registered_method_has_a_default_learning_rate_with_its_source():
    for name in method_names():
        rate = DEFAULT_LEARNING_RATES[name]
        assert rate.value > 0 and rate.source


@pytest.mark.parametrize("flags, layers", [([], [3, 4, 5]), (["--lora_layers", "0", "1", "2", "3", "4", "5"], None)])
def test_the_recipe_puts_lora_on_the_last_three_layers_and_plain_peft_loads_it(tmp_path, flags, layers):
    """The adapter the demo saves holds LoRA on layers 3-5 only (the flag widens it) and plain `peft` loads it onto
    the recipe's model class."""
    from peft import PeftModel

    cli.run_demo([*FAST, *flags, "--method", "ffa_lora", "--output_dir", str(tmp_path)])
    folder = tmp_path / "ffa_lora"
    config = json.loads((folder / "adapter_config.json").read_text())
    expected = layers if layers is not None else list(range(6))
    assert config["layers_to_transform"] in (layers, expected)
    saved = {int(name.split("layer.")[1].split(".")[0]) for name in load_file(str(folder / "adapter_model.safetensors"))
             if "lora_" in name}  # fmt: skip
    assert saved == set(expected)
    loaded = PeftModel.from_pretrained(demo_task.minilm_classifier(), str(folder))
    adapted = {int(name.split("layer.")[1].split(".")[0]) for name, _ in loaded.named_parameters() if "lora_B" in name}
    assert adapted == set(expected)
