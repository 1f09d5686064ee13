"""Sequence classification on an encoder's token states pooled without BERT's pooler: the shared forward, and the
choice of class for a checkpoint (`load_sequence_classifier`).

`mean` reads the masked mean over an example's own tokens (what sentence-embedding checkpoints such as
all-MiniLM-L6-v2 were trained to produce), `cls` the first token's last hidden state, `pooler` the checkpoint's own
head (BertForSequenceClassification reads BERT's pooler, tanh(dense([CLS])); RobertaForSequenceClassification a
fresh dense + tanh layer on <s>). The project's diagnostics found the pooler a poor input for a fresh head under
short noisy DP runs (benchmarks/RESULTS.md#head-input), hence `mean` in the DP recipe (hf_fedlora.recipe).

Each example's pooled feature depends on its own tokens only (padding is masked out), as DP-SGD requires. Parameter
names are the Hub classes' (`bert.*` / `roberta.*`, `classifier.*`, without the unused pooler), so a checkpoint
loads with `from_pretrained` and LoRA targets the same modules. An adapter trained on one of these classes must be
loaded onto the same class: the record and the model card name it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel, RobertaConfig, RobertaModel, RobertaPreTrainedModel
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import can_return_tuple

#: What the classifier head reads; "pooler" is the checkpoint's own Auto class.
POOLINGS = ("mean", "cls", "pooler")
#: Model types whose encoder these classes rebuild (the BERT and RoBERTa families).
BERT_LIKE = ("bert",)
ROBERTA_LIKE = ("roberta",)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over each example's own tokens (mask 1), padding left out; all tokens when there is no mask."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pool_tokens(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per example: the masked mean of its tokens, or its first token ([CLS] / <s>)."""
    if pooling == "mean":
        return masked_mean(hidden_states, attention_mask)
    if pooling == "cls":
        return hidden_states[:, 0]
    raise ValueError(f"pool_tokens pools 'mean' or 'cls', got {pooling!r}")


class PooledClassifierMixin:
    """Dropout and a linear head on pooled token states; the subclass names its encoder and `pooling`."""

    pooling: str = "mean"
    encoder_attribute: str = "bert"

    def _init_head(self, config: Any) -> None:
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

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
        encoder = getattr(self, self.encoder_attribute)
        outputs = encoder(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        pooled = pool_tokens(outputs.last_hidden_state, attention_mask, self.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else ForSequenceClassificationLoss(labels, logits, self.config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class BertPooledForSequenceClassification(PooledClassifierMixin, BertPreTrainedModel):
    """BERT without its pooler, dropout and a linear head on the tokens pooled as the subclass's `pooling` says."""

    encoder_attribute = "bert"

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()


class RobertaPooledForSequenceClassification(PooledClassifierMixin, RobertaPreTrainedModel):
    """RoBERTa without a pooler, dropout and a linear head on the tokens pooled as the subclass's `pooling` says
    (RobertaForSequenceClassification's head is a fresh dense + tanh layer on <s>)."""

    encoder_attribute = "roberta"

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.config = config
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        self._init_head(config)
        self.post_init()


def pools_tokens(model_type: str) -> bool:
    """Whether hf_fedlora.models has 'mean' and 'cls' classifiers for checkpoints of this model type."""
    return model_type in BERT_LIKE or model_type in ROBERTA_LIKE


def sequence_classifier_class(model_type: str, pooling: str) -> type:
    """The class whose head reads `pooling` for a checkpoint of `model_type` (a config's `model_type`)."""
    from transformers import AutoModelForSequenceClassification

    from .cls_pooling import BertClsPoolingForSequenceClassification, RobertaClsPoolingForSequenceClassification
    from .mean_pooling import BertMeanPoolingForSequenceClassification, RobertaMeanPoolingForSequenceClassification

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if pooling == "pooler":
        return AutoModelForSequenceClassification
    classes = {
        ("bert", "mean"): BertMeanPoolingForSequenceClassification,
        ("bert", "cls"): BertClsPoolingForSequenceClassification,
        ("roberta", "mean"): RobertaMeanPoolingForSequenceClassification,
        ("roberta", "cls"): RobertaClsPoolingForSequenceClassification,
    }
    if not pools_tokens(model_type):
        raise ValueError(
            f"pooling {pooling!r} is available for BERT-like ({', '.join(BERT_LIKE)}) and RoBERTa-like "
            f"({', '.join(ROBERTA_LIKE)}) checkpoints; this one is {model_type!r}: use pooling 'pooler' (the "
            "checkpoint's own classification head)"
        )
    return classes[("bert" if model_type in BERT_LIKE else "roberta", pooling)]


def load_sequence_classifier(
    model_name_or_path: str, pooling: str = "mean", dropout: float | None = None, config: Any = None, **kwargs: Any
):
    """`from_pretrained` of the class for `pooling`; `dropout` overrides the checkpoint's hidden and attention
    dropout (the DP recipe turns it off); other keyword arguments go to `from_pretrained` (num_labels, id2label,
    cache_dir, revision, token, ...)."""
    from transformers import AutoConfig

    if config is None:
        config_kwargs = {k: kwargs.pop(k) for k in ("num_labels", "id2label", "label2id") if k in kwargs}
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "trust_remote_code") if k in kwargs}
        config = AutoConfig.from_pretrained(model_name_or_path, **config_kwargs, **hub)
    if dropout is not None:
        config.hidden_dropout_prob = dropout
        config.attention_probs_dropout_prob = dropout
    model_class = sequence_classifier_class(config.model_type, pooling)
    return model_class.from_pretrained(model_name_or_path, config=config, **kwargs)
