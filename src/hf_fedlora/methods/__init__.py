"""One file per federated LoRA method: its config class and the method object it builds."""

from .base import FederatedMethod
from .ffa_lora import FFALoraConfig, FFALoraMethod
from .lora import FedLoraConfig, FedLoraMethod

__all__ = ["FederatedMethod", "FedLoraConfig", "FedLoraMethod", "FFALoraConfig", "FFALoraMethod"]
