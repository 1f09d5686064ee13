"""Task models the Hub's classes lack, for checkpoints trained for another pooling (e.g. sentence embeddings)."""

from .mean_pooling import BertMeanPoolingForSequenceClassification

__all__ = ["BertMeanPoolingForSequenceClassification"]
