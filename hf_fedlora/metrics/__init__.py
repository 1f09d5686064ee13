"""Evaluation metrics shipped with the package, as `evaluate` metric scripts that load offline.

`evaluate.load("glue")` fetches the script from the Hub; the copy here installs with the wheel, so
the example scripts (and users) evaluate without a network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GLUE_METRIC_DIR = Path(__file__).resolve().parent / "glue"


def glue_metric_path() -> str:
    """The folder of the GLUE metric script, for `evaluate.load(glue_metric_path(), config_name)`."""
    return str(GLUE_METRIC_DIR)


def load_glue_metric(config_name: str, **kwargs: Any):
    """The shipped GLUE metric for a GLUE task ("cola", "mrpc", "stsb", ...), "classification" or "regression".

    Keyword arguments go to `evaluate.load` (e.g. `cache_dir`, `experiment_id`).
    """
    import evaluate

    return evaluate.load(glue_metric_path(), config_name, **kwargs)


__all__ = ["GLUE_METRIC_DIR", "glue_metric_path", "load_glue_metric"]
