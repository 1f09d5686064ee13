"""BERT and RoBERTa sequence classification over the masked mean of the last hidden states, not over a pooler.

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained so that the mean over a text's tokens is its
representation; their pooler, tanh(dense([CLS])), was not. BertForSequenceClassification's head reads the pooler, a
feature with two thirds of its energy in one direction shared by every text, so a fresh head learns the classes
slowly under short noisy DP runs (benchmarks/RESULTS.md#head-input: 0.63 against 0.68 test accuracy on the tweets).
The shared forward and the choice of class live in hf_fedlora.models.pooling.
"""

from __future__ import annotations

from .pooling import BertPooledForSequenceClassification, RobertaPooledForSequenceClassification, masked_mean

__all__ = ["BertMeanPoolingForSequenceClassification", "RobertaMeanPoolingForSequenceClassification", "masked_mean"]


class BertMeanPoolingForSequenceClassification(BertPooledForSequenceClassification):
    """BertForSequenceClassification with the pooler replaced by the masked mean over tokens (dropout, then a linear
    head, and the same losses). Load a checkpoint with `BertMeanPoolingForSequenceClassification.from_pretrained`."""

    pooling = "mean"


class RobertaMeanPoolingForSequenceClassification(RobertaPooledForSequenceClassification):
    """RoBERTa with a linear head on the masked mean over tokens."""

    pooling = "mean"
