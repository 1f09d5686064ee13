"""Tests for the offline model and data assets used by the demo and the other tests."""

from pathlib import Path

import pytest
from datasets import ClassLabel

from hf_fedlora.offline_assets import (
    TWEET_SENTIMENT_LABELS,
    load_tweet_sentiment,
    minilm_path,
    tweet_sentiment_csv_path,
)


@pytest.fixture(scope="module")
def small_tweets():
    return load_tweet_sentiment(test_size=0.2, seed=0, max_examples=500)


def test_csv_is_found():
    path = tweet_sentiment_csv_path()
    assert path.is_file() and path.suffix == ".csv"


def test_columns_and_classes(small_tweets):
    assert set(small_tweets) == {"train", "test"}
    for split in small_tweets.values():
        assert split.column_names == ["text", "label"]
        label = split.features["label"]
        assert isinstance(label, ClassLabel)
        assert label.names == list(TWEET_SENTIMENT_LABELS) == ["negative", "neutral", "positive"]
        assert all(isinstance(t, str) and t.strip() for t in split["text"])
        assert set(split["label"]) == {0, 1, 2}


def test_sizes_and_disjoint_splits(small_tweets):
    train, test = small_tweets["train"], small_tweets["test"]
    assert len(train) + len(test) == 500
    assert len(test) == 100
    assert not set(train["text"]) & set(test["text"])


def test_split_is_deterministic(small_tweets):
    again = load_tweet_sentiment(test_size=0.2, seed=0, max_examples=500)
    for name in ("train", "test"):
        assert again[name]["text"] == small_tweets[name]["text"]
        assert again[name]["label"] == small_tweets[name]["label"]
    other = load_tweet_sentiment(test_size=0.2, seed=1, max_examples=500)
    assert other["test"]["text"] != small_tweets["test"]["text"]


def test_split_is_stratified(small_tweets):
    def shares(split):
        labels = split["label"]
        return [labels.count(c) / len(labels) for c in range(3)]

    for a, b in zip(shares(small_tweets["train"]), shares(small_tweets["test"]), strict=True):
        assert abs(a - b) < 0.02


def test_full_corpus():
    ds = load_tweet_sentiment()
    total = len(ds["train"]) + len(ds["test"])
    # 38,158 rows less repeated texts.
    assert 37_000 < total <= 38_158
    assert abs(len(ds["test"]) - 0.1 * total) <= 1
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])


def test_tiny_subset_still_splits():
    ds = load_tweet_sentiment(test_size=0.5, seed=3, max_examples=4)
    assert len(ds["train"]) + len(ds["test"]) == 4


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_tweet_sentiment(test_size=1.5)
    with pytest.raises(ValueError):
        load_tweet_sentiment(max_examples=1)


def test_minilm_loads_offline():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    assert (Path(path) / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.eval()
    batch = tokenizer(["I love this car.", "Worst flight ever."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
