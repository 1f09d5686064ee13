"""Federated, differentially private LoRA fine-tuning for the Hugging Face stack."""

from .federation.partition import (
    label_histogram,
    partition_by_column,
    partition_by_label_proportions,
    partition_dataset,
    partition_dirichlet,
    partition_iid,
)
from .methods import (
    DeerConfig,
    FederatedMethod,
    FedLoraConfig,
    FedSVDConfig,
    FFALoraConfig,
    LALoraConfig,
    RoLoraConfig,
)
from .methods.registry import register_method, unregister_method
from .trainer import FederatedTrainer
from .training_args import FederatedTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "DeerConfig",
    "FFALoraConfig",
    "FedLoraConfig",
    "FedSVDConfig",
    "FederatedMethod",
    "FederatedTrainer",
    "FederatedTrainingArguments",
    "LALoraConfig",
    "RoLoraConfig",
    "label_histogram",
    "partition_by_column",
    "partition_by_label_proportions",
    "partition_dataset",
    "partition_dirichlet",
    "partition_iid",
    "register_method",
    "unregister_method",
]
