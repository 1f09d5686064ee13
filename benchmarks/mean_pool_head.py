"""A diagnostic: the recipe with BERT's pooler replaced by the mean over tokens, on validation tweets.

BertForSequenceClassification's head reads the pooler, tanh(dense([CLS])), a feature whose energy lies mostly in
one direction shared by every tweet (benchmarks/head_conditioning.py), so a fresh head learns slowly in a short DP
run. all-MiniLM-L6-v2 was trained for the mean over tokens. This script patches, for this process only,
`BertPooler.forward` to return the masked mean of the last hidden states (no dense, no tanh: the head reads 384
mean-pooled features) and runs benchmarks/factor_rates.py, whose flags and lr_sweep.py's pass through (validation
split, recipe defaults; `--scale_b 0` trains the head alone). Plain `peft` cannot rebuild such a model from the
Hub's BertForSequenceClassification: this measures what the head costs. It found the recipe's model, which now ships
as hf_fedlora.models.BertMeanPoolingForSequenceClassification (the same computation, without this patch) and is
utility.py's and the demo's default. RESULTS.md, sections 15 and 16.

    .venv/bin/python benchmarks/mean_pool_head.py --methods ffa_lora --rates 5e-2 --name mean_pool_ffa_lora
"""

from __future__ import annotations

import factor_rates
import torch
from transformers.models.bert import modeling_bert

from hf_fedlora.models.mean_pooling import masked_mean

bert_forward = modeling_bert.BertModel.forward


def forward_keeping_mask(self, input_ids=None, attention_mask=None, *args, **kwargs):
    if self.pooler is not None:  # utility.py --pooling pooler; the shipped mean-pooling class has no pooler
        self.pooler.attention_mask = attention_mask  # read by the pooler below, in the same forward
    return bert_forward(self, input_ids, attention_mask, *args, **kwargs)


def mean_pool(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return masked_mean(hidden_states, getattr(self, "attention_mask", None))  # what the shipped class computes


if __name__ == "__main__":
    modeling_bert.BertModel.forward = forward_keeping_mask
    modeling_bert.BertPooler.forward = mean_pool
    factor_rates.main()
