"""Every benchmark script (benchmarks/*.py, benchmarks/diagnostics/*.py) answers --help, and importing one runs nothing.

Benchmarks are run by hand, not by the tests, so a library change can break one unseen (memory.py once read a
trainer attribute that no longer existed, and the memory table went stale). Parsing --help imports the script and
everything it imports from the package, which is where such a break shows; running a benchmark is left to people.
One interpreter checks every script (torch, transformers and the package are imported once, not once a script),
and each script gets its own test result. The scripts run from a copy of benchmarks/, so a script that ran instead
of printing its help would write its results into the copy, not over the committed ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
DIAGNOSTICS = BENCHMARKS / "diagnostics"
HELPERS = {"common.py", "benchmarks_path.py"}  # imported by the scripts, not scripts themselves
SCRIPTS = sorted(
    path for folder in (BENCHMARKS, DIAGNOSTICS) for path in folder.glob("*.py") if path.name not in HELPERS
)

# Run in a child: import every script as a module with a command line no script accepts (a script that ran at
# import would fail to parse it, or print), then run each as `python <script> --help` would, from its own folder.
CHECKER = """
import contextlib, importlib, io, json, runpy, sys
scripts, folders = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.path[:0] = folders
report = {}
for path in scripts:
    name, printed, error = path.rsplit("/", 1)[-1][:-3], io.StringIO(), None
    sys.argv = ["benchmark", "--no-such-flag"]
    try:
        with contextlib.redirect_stdout(printed):
            importlib.import_module(name)
    except BaseException as exception:
        error = repr(exception)
    report[path] = {"import_error": error, "import_printed": printed.getvalue()}
for path in scripts:
    printed, exit_code = io.StringIO(), "ran to the end without exiting"
    sys.argv, sys.path[0] = [path, "--help"], path.rsplit("/", 1)[0]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:
        exit_code = exit.code or 0
    except BaseException as exception:
        exit_code = repr(exception)
    report[path].update(help_exit=exit_code, help_printed=printed.getvalue())
print("REPORT " + json.dumps(report))
"""


def test_the_scripts_are_found():
    names = {path.relative_to(BENCHMARKS).as_posix() for path in SCRIPTS}
    assert {"utility.py", "memory.py", "throughput.py", "diagnostics/fp16_loss_scale.py"} <= names


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[str, dict]:
    """{script's path relative to benchmarks/: what importing it and running it with --help did}."""
    copy = tmp_path_factory.mktemp("benchmarks") / "benchmarks"
    shutil.copytree(BENCHMARKS, copy, ignore=shutil.ignore_patterns("results", "__pycache__", "*.md"))
    relative = [path.relative_to(BENCHMARKS).as_posix() for path in SCRIPTS]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout's package
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scripts = json.dumps([str(copy / name) for name in relative])
    folders = json.dumps([str(copy), str(copy / "diagnostics")])
    completed = subprocess.run(
        [sys.executable, "-c", CHECKER, scripts, folders],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("REPORT ")]
    assert completed.returncode == 0 and lines, completed.stdout[-2000:] + completed.stderr[-4000:]
    checked = json.loads(lines[-1][len("REPORT ") :])
    return {name: checked[str(copy / name)] for name in relative}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.relative_to(BENCHMARKS).as_posix())
def test_importing_a_benchmark_runs_nothing(report, script):
    checked = report[script.relative_to(BENCHMARKS).as_posix()]
    assert checked["import_error"] is None, checked["import_error"]
    assert checked["import_printed"] == ""


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.relative_to(BENCHMARKS).as_posix())
def test_every_benchmark_answers_help(report, script):
    checked = report[script.relative_to(BENCHMARKS).as_posix()]
    assert checked["help_exit"] == 0, checked["help_exit"]
    assert checked["help_printed"].startswith("usage:"), checked["help_printed"][:2000]


def test_memory_benchmark_counts_every_clients_privacy_state(tmp_path):
    """memory.py's expected bytes (what its table judges growth against) read each client's DP state through the
    trainer's public privacy object: one secret sampling and one noise generator per client, and, since a weighted
    mean streams, one running sum held during aggregation, not one upload per client."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import memory  # benchmarks/memory.py
    finally:
        sys.path.remove(str(BENCHMARKS))
    from tiny import fed_args, tiny_peft, toy_dataset

    from hf_fedlora import FederatedTrainer, FedLoraConfig

    model = tiny_peft(FedLoraConfig)
    args = fed_args(tmp_path, num_clients=3, num_rounds=1, local_steps=1, dp_noise_multiplier=1.0)
    trainer = FederatedTrainer(model=model, args=args, train_dataset=toy_dataset(60))
    trainer.train()
    states = memory.client_states(trainer)

    generator_bytes = torch.Generator().get_state().numel()
    assert states["sampling_rng_bytes"] == states["noise_rng_bytes"] == 3 * generator_bytes
    upload = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.requires_grad)
    assert states["payload_bytes"] == upload  # LoRA sends A, B and the head: every trainable tensor
    assert states["streaming_aggregation"] and states["payloads_held_bytes"] == upload
    parts = ("sampling_rng_bytes", "noise_rng_bytes", "accountant_bytes", "payloads_held_bytes")
    assert states["expected_bytes"] == sum(states[part] for part in parts)


def test_every_cited_results_anchor_exists():
    """Code and docs cite benchmarks/RESULTS.md and HISTORY.md by anchor (`RESULTS.md#utility`), which stays when
    sections move; a citation of an anchor that does not exist points nowhere."""
    anchors = {
        name: set(re.findall(r'<a id="([^"]+)"></a>', (BENCHMARKS / name).read_text(encoding="utf-8")))
        for name in ("RESULTS.md", "HISTORY.md")
    }
    sources = {ROOT / "README.md"}
    for folder in ("hf_fedlora", "benchmarks", "examples", "tests", "docs"):
        sources |= {path for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".md")}
    missing = []
    for path in sorted(sources):
        text = path.read_text(encoding="utf-8")
        for document, anchor in re.findall(r"(RESULTS\.md|HISTORY\.md)#([a-z0-9-]+)", text):
            if anchor not in anchors[document]:
                missing.append(f"{path.relative_to(ROOT)}: {document}#{anchor}")
        for anchor in re.findall(r"\]\(#([a-z0-9-]+)\)", text) if path.parent == BENCHMARKS else []:
            if anchor not in anchors.get(path.name, set()):
                missing.append(f"{path.relative_to(ROOT)}: #{anchor}")
    assert anchors["RESULTS.md"] and not missing, missing


def test_instruction_benchmark_adapts_the_modules_asked_and_validation_only_leaves_the_test_rows_unseen(
    tmp_path, monkeypatch
):
    """--lora_target_modules reaches the training script; with --validation_only every rate is trained and scored on
    validation, the best is chosen, and nothing scores the test rows (a setting explored there spends none of them)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import instruction  # benchmarks/instruction.py
    finally:
        sys.path.remove(str(BENCHMARKS))
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        output_dir = Path(command[command.index("--output_dir") + 1])
        rate = float(command[command.index("--learning_rate") + 1])
        output_dir.mkdir(parents=True)
        results = {"eval_exact_match": 0.7 if rate == 2e-2 else 0.6, "eval_loss": 0.3, "epsilon": 8.0}
        (output_dir / "all_results.json").write_text(json.dumps(results | {"wall_seconds": 1, "peak_rss_mib": 1}))
        return subprocess.CompletedProcess(command, 0, "", "")

    def no_test_scoring(*args, **kwargs):
        raise AssertionError("the test rows were scored")

    monkeypatch.setattr(instruction, "smollm2_folder", lambda: str(tmp_path))
    monkeypatch.setattr(instruction.subprocess, "run", fake_run)
    monkeypatch.setattr(instruction, "score", no_test_scoring)
    args = instruction.parse_args(
        ["--data_dir", str(tmp_path), "--methods", "ffa_lora", "--rates", "ffa_lora=1e-2,2e-2,5e-2",
         "--validation_only", "--lora_target_modules", "q_proj,o_proj,down_proj"]
    )  # fmt: skip
    cell = instruction.run_cell(None, "ffa_lora", 8.0, args)

    assert [c[c.index("--lora_target_modules") + 1] for c in commands] == ["q_proj,o_proj,down_proj"] * 3
    assert cell["rate"] == 2e-2 and [t["rate"] for t in cell["rates_tried"]] == [1e-2, 2e-2, 5e-2]
    assert not any(key.startswith("test_") for key in cell)
