"""BERT and RoBERTa sequence classification with a linear head on the first token's last hidden state ([CLS] or
<s>), without the pooler's dense + tanh layer. The shared forward lives in hf_fedlora.models.pooling."""

from __future__ import annotations

from .pooling import BertPooledForSequenceClassification, RobertaPooledForSequenceClassification

__all__ = ["BertClsPoolingForSequenceClassification", "RobertaClsPoolingForSequenceClassification"]


class BertClsPoolingForSequenceClassification(BertPooledForSequenceClassification):
    """Dropout and a linear head on BERT's [CLS] state (the pooler is dropped)."""

    pooling = "cls"


class RobertaClsPoolingForSequenceClassification(RobertaPooledForSequenceClassification):
    """Dropout and a linear head on RoBERTa's <s> state."""

    pooling = "cls"
