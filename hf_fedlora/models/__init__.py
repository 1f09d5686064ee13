"""Task models the Hub's classes lack, for checkpoints trained for another pooling (e.g. sentence embeddings)."""

from .cls_pooling import BertClsPoolingForSequenceClassification, RobertaClsPoolingForSequenceClassification
from .mean_pooling import BertMeanPoolingForSequenceClassification, RobertaMeanPoolingForSequenceClassification
from .pooling import POOLINGS, load_sequence_classifier, sequence_classifier_class

__all__ = [
    "POOLINGS",
    "BertClsPoolingForSequenceClassification",
    "BertMeanPoolingForSequenceClassification",
    "RobertaClsPoolingForSequenceClassification",
    "RobertaMeanPoolingForSequenceClassification",
    "load_sequence_classifier",
    "sequence_classifier_class",
]
