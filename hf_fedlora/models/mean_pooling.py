"""BERT sequence classification over the masked mean of the last hidden states, not over the pooler.

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained so that the mean over a text's tokens is its
representation; their pooler, tanh(dense([CLS])), was not. BertForSequenceClassification's head reads the pooler, a
feature with two thirds of its energy in one direction shared by every text, so a fresh head learns the classes
slowly under short noisy DP runs (benchmarks/RESULTS.md#head-input: 0.63 against 0.68 test accuracy on the tweets).

The parameter names are those of BertForSequenceClassification (`bert.*`, `classifier.*`; only the unused pooler
is dropped), so a BERT checkpoint loads into it with `from_pretrained` and LoRA targets the same modules. An adapter
trained on it must be loaded onto this class: on BertForSequenceClassification it would read the pooler instead.
Each example's pooled feature depends on its own tokens only (its mask excludes padding), as DP-SGD requires.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import can_return_tuple


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over each example's own tokens (mask 1), padding left out; all tokens when there is no mask."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class BertMeanPoolingForSequenceClassification(BertPreTrainedModel):
    """BertForSequenceClassification with the pooler replaced by the masked mean over tokens (dropout, then a linear
    head, and the same losses). Load a checkpoint with `BertMeanPoolingForSequenceClassification.from_pretrained`."""

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple  # return_dict=False gives a tuple, as in every transformers model
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, ...] | SequenceClassifierOutput:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
