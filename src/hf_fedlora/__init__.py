"""Federated, differentially private LoRA fine-tuning for the Hugging Face stack."""

from .federation.partition import (
    label_histogram,
    partition_by_column,
    partition_by_label_proportions,
    partition_dataset,
    partition_dirichlet,
    partition_iid,
)
from .methods import FederatedMethod, FedLoraConfig, FFALoraConfig, LALoraConfig
from .trainer import FederatedTrainer
from .training_args import FederatedTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "FFALoraConfig",
    "FedLoraConfig",
    "FederatedMethod",
    "FederatedTrainer",
    "FederatedTrainingArguments",
    "LALoraConfig",
    "label_histogram",
    "partition_by_column",
    "partition_by_label_proportions",
    "partition_dataset",
    "partition_dirichlet",
    "partition_iid",
]
