"""GLUE metrics as an `evaluate` metric script that ships inside hf_fedlora, so it loads offline.

Load it with `evaluate.load(hf_fedlora.metrics.glue_metric_path(), config_name)` (or
`hf_fedlora.metrics.load_glue_metric(config_name)`), never `evaluate.load("glue")`, which needs the Hub.
The metric per task follows GLUE (and the Hub's `glue` metric): Matthews correlation for CoLA, accuracy and
binary F1 (positive label 1) for MRPC and QQP, Pearson and Spearman correlation for STS-B, accuracy for
the rest. Two extra configs cover your own data: "classification" (accuracy, macro-F1, Matthews
correlation) and "regression" (Pearson, Spearman, mean squared error).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_DESCRIPTION = __doc__

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted labels (class ids), or predicted scores for "stsb" and "regression".
    references: gold labels (class ids), or gold scores for "stsb" and "regression".
Returns: a dict with, depending on the config:
    "accuracy", "f1" (binary, positive label 1), "macro_f1", "matthews_correlation",
    "pearson", "spearmanr", "mse".
Example:
    >>> metric = evaluate.load(glue_metric_path(), "mrpc")
    >>> metric.compute(predictions=[0, 1], references=[0, 1])
    {'accuracy': 1.0, 'f1': 1.0}
"""

ACCURACY_TASKS = ("sst2", "mnli", "mnli_mismatched", "mnli_matched", "qnli", "rte", "wnli", "hans")
ACCURACY_F1_TASKS = ("mrpc", "qqp")
REGRESSION_CONFIGS = ("stsb", "regression")
CONFIGS = ("cola", *ACCURACY_F1_TASKS, *ACCURACY_TASKS, "classification", *REGRESSION_CONFIGS)


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float((predictions == references).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in CONFIGS:
            raise KeyError(f"Unknown GLUE metric config {self.config_name!r}; choose one of {list(CONFIGS)}")
        value_type = "float32" if self.config_name in REGRESSION_CONFIGS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            format="numpy",
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        name = self.config_name
        if name == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if name in ACCURACY_F1_TASKS:
            return {"accuracy": _accuracy(predictions, references), "f1": float(f1_score(references, predictions))}
        if name in ACCURACY_TASKS:
            return {"accuracy": _accuracy(predictions, references)}
        if name == "classification":
            return {
                "accuracy": _accuracy(predictions, references),
                "macro_f1": float(f1_score(references, predictions, average="macro")),
                "matthews_correlation": float(matthews_corrcoef(references, predictions)),
            }
        scores = {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
        if name == "regression":
            scores["mse"] = float(np.mean((predictions - references) ** 2))
        return scores
