"""BERT and RoBERTa sequence classification with a linear head on the first token's last hidden state ([CLS] or
<s>), without the pooler's dense + tanh layer. The shared forward lives in hf_fedlora.models.pooling."""

from __future__ import annotations

from transformers import BertConfig, BertModel, BertPreTrainedModel, RobertaConfig, RobertaModel, RobertaPreTrainedModel

from .pooling import PooledClassifierMixin

__all__ = ["BertClsPoolingForSequenceClassification", "RobertaClsPoolingForSequenceClassification"]


class BertClsPoolingForSequenceClassification(PooledClassifierMixin, BertPreTrainedModel):
    """Dropout and a linear head on BERT's [CLS] state (the pooler is dropped)."""

    pooling = "cls"
    encoder_attribute = "bert"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()


class RobertaClsPoolingForSequenceClassification(PooledClassifierMixin, RobertaPreTrainedModel):
    """Dropout and a linear head on RoBERTa's <s> state."""

    pooling = "cls"
    encoder_attribute = "roberta"

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()
