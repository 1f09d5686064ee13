"""Plot test accuracy against the privacy budget from utility.py's results (needs matplotlib).

Kept apart from utility.py so the figure can be redrawn from the json without rerunning anything
and without torch: one line per method over the target epsilons (error bars: std over seeds, thin
caps: min-max), the non-private run as a separate marker at the right, the centralised
non-private LoRA as a horizontal line (band: min-max over seeds).

    .venv/bin/python benchmarks/plot_utility.py                  # from benchmarks/results/utility.json
    .venv/bin/python benchmarks/plot_utility.py --name utility_quick
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CEILING = "centralised"
# Non-private ceilings, drawn as horizontal lines: (label, line style).
CEILINGS = {CEILING: ("centralised LoRA", "--"), "linear_probe": ("centralised linear probe", ":")}


def plot_summary(summary: list[dict[str, Any]], name: str, settings: dict[str, Any] | None = None) -> Path:
    """Draw the summary rows (as utility.summarise writes them) to results/<name>_accuracy_vs_epsilon.png."""
    epsilons = sorted({row["epsilon"] for row in summary if row["epsilon"] is not None})
    position = {epsilon: i for i, epsilon in enumerate(epsilons)}
    nonprivate_x = len(epsilons) + 0.5  # set apart from the private budgets: it is not "a large epsilon"
    methods = list(dict.fromkeys(row["method"] for row in summary if row["method"] not in CEILINGS))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    width = 0.25 / max(1, len(methods))  # small sideways offsets so error bars do not overlap
    for index, method in enumerate(methods):
        rows = [row for row in summary if row["method"] == method]
        offset = (index - (len(methods) - 1) / 2) * width
        color = f"C{index}"
        private = sorted((row for row in rows if row["epsilon"] is not None), key=lambda row: row["epsilon"])
        if private:
            xs = [position[row["epsilon"]] + offset for row in private]
            one_rate = len({row.get("learning_rate") for row in private}) == 1
            label = _label(method, private[0]) if one_rate else f"{method} (rate chosen per cell)"
            _scores(ax, xs, [row["accuracy"] for row in private], color, "o-", label)
        for row in rows:
            if row["epsilon"] is None:
                label = None if private else _label(method, row)
                _scores(ax, [nonprivate_x + offset], [row["accuracy"]], color, "*", label, markersize=12)
    for row in summary:
        if row["method"] in CEILINGS:
            stats = row["accuracy"]
            ceiling, style = CEILINGS[row["method"]]
            label = f"{ceiling} (band: min-max)"
            ax.axhline(stats["mean"], color="black", linestyle=style, linewidth=1, label=label)
            ax.axhspan(stats["min"], stats["max"], color="black", alpha=0.08, linewidth=0)
    if epsilons:
        ax.axvline((len(epsilons) - 1 + nonprivate_x) / 2, color="grey", linewidth=0.5)
    ax.set_xticks([*range(len(epsilons)), nonprivate_x], [f"ε = {e:g}" for e in epsilons] + ["non-private"])
    ax.set_xlim(-0.5, nonprivate_x + 0.5)
    ax.set_ylabel("test accuracy (bars: std; faint: min-max)")
    delta = f"δ = {settings['delta']:g}, " if settings else ""
    ax.set_xlabel(f"target ε per client ({delta}unit: one example; evenly spaced, not to scale)")
    title = "Accuracy vs privacy budget"
    if settings:
        title += (
            f"\n{settings['model']}, {settings['clients']} clients, Dirichlet α={settings['dirichlet_alpha']}, "
            f"{settings['examples_per_run']} examples/run"
        )
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = RESULTS_DIR / f"{name}_accuracy_vs_epsilon.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _label(method: str, row: dict[str, Any]) -> str:
    """The method, with its learning rate when one rate was used (benchmarks/vision.py chooses one per cell)."""
    rate = row.get("learning_rate")
    return method if rate is None else f"{method} (lr {rate:g})"


def _scores(ax, xs, stats, color, style, label, markersize=6) -> None:
    """Mean with std error bars, and min-max as thin bars behind them."""
    means = [s["mean"] for s in stats]
    ax.errorbar(xs, means, yerr=[[s["mean"] - s["min"] for s in stats], [s["max"] - s["mean"] for s in stats]],
                fmt="none", ecolor=color, elinewidth=0.8, alpha=0.4, capsize=2)  # fmt: skip
    ax.errorbar(xs, means, yerr=[s["std"] for s in stats], fmt=style, color=color, capsize=4, label=label,
                markersize=markersize)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="utility", help="Results file benchmarks/results/<name>.json.")
    args = parser.parse_args()
    results = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
    if "summary" not in results:
        raise SystemExit(f"{args.name}.json has no summary yet: let utility.py finish (or rerun it with --resume)")
    print(f"wrote {plot_summary(results['summary'], args.name, results.get('settings'))}")


if __name__ == "__main__":
    main()
