"""The demo's results: one table (printed, markdown, JSON) and the accuracy plots (PNG, needs matplotlib).

A row is one trained adapter: its method, the privacy it spent (from the trainer's privacy report), its final
test scores, what each client uploaded, how long it took and its learning rate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hub import format_delta, format_epsilon

HEADERS = ["method", "epsilon", "delta", "unit", "accuracy", "macro-F1", "MB up/client", "seconds", "lr"]


def budget_label(row: dict[str, Any]) -> str:
    """The privacy setting a run was asked for: its target epsilon, its fixed noise, or non-private."""
    if row["target_epsilon"] is not None:
        return f"ε={row['target_epsilon']:g}"
    if row["noise_multiplier"] is not None:
        return f"σ={row['noise_multiplier']:g}"
    return "non-private"


def table_cells(row: dict[str, Any]) -> list[str]:
    """One row as text; epsilon and delta rounded up, as everywhere else in the package."""
    private = row["epsilon"] is not None
    return [
        row["method"],
        format_epsilon(row["epsilon"]) if private else "-",
        format_delta(row["delta"]) if private else "-",
        row["unit"] or "non-private",
        f"{row['accuracy']:.4f}",
        f"{row['macro_f1']:.4f}",
        f"{row['mb_uploaded_per_client']:.3f}",
        f"{row['seconds']:.0f}",
        f"{row['learning_rate']:g}",
    ]


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    cells = [HEADERS] + [table_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown(rows: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    return "# hf-fedlora demo\n\n" + "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"


def write_tables(output_dir: str | Path, rows: Sequence[dict[str, Any]], notes: Sequence[str], settings: dict) -> list:
    """results.md and results.json in output_dir; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = output_dir / "results.md"
    markdown.write_text(format_markdown(rows, notes))
    record = output_dir / "results.json"
    record.write_text(json.dumps({"settings": settings, "notes": list(notes), "rows": list(rows)}, indent=2) + "\n")
    return [markdown, record]


def plot_accuracy_per_round(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Test accuracy after each round (round 0: before training), one line per method; one panel per budget."""
    plt = _pyplot()
    budgets = list(dict.fromkeys(budget_label(row) for row in rows))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.5 * len(budgets), 4.5), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets, strict=True):
        panel = [row for row in rows if budget_label(row) == budget]
        for row in panel:
            rounds, accuracy = zip(*row["accuracy_per_round"], strict=True)
            ax.plot(rounds, accuracy, marker="o", label=f"{row['method']} (lr {row['learning_rate']:g})")
        ax.set_title(budget if budget == "non-private" else f"{budget}, unit: one {panel[0]['unit']}", fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(title, fontsize=10)
    return _save(fig, plt, path)


def plot_accuracy_vs_epsilon(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Final test accuracy against the target epsilon, one line per method; non-private set apart at the right."""
    plt = _pyplot()
    epsilons = sorted({row["target_epsilon"] for row in rows if row["target_epsilon"] is not None})
    position = {epsilon: i for i, epsilon in enumerate(epsilons)}
    nonprivate_x = len(epsilons) + 0.5
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, method in enumerate(dict.fromkeys(row["method"] for row in rows)):
        mine = [row for row in rows if row["method"] == method]
        private = sorted((r for r in mine if r["target_epsilon"] is not None), key=lambda r: r["target_epsilon"])
        ax.plot([position[r["target_epsilon"]] for r in private], [r["accuracy"] for r in private], "o-",
                color=f"C{index}", label=method)  # fmt: skip
        for row in mine:
            if row["target_epsilon"] is None and row["noise_multiplier"] is None:
                ax.plot([nonprivate_x], [row["accuracy"]], "*", color=f"C{index}", markersize=12)
    ax.set_xticks([*range(len(epsilons)), nonprivate_x], [f"ε = {e:g}" for e in epsilons] + ["non-private"])
    ax.set_xlabel("target ε per client (evenly spaced, not to scale)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, plt, path)


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("The demo's plots need matplotlib: pip install 'hf-fedlora[demo]'") from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
