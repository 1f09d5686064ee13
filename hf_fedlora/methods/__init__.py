"""One file per federated LoRA method: its config class and the method object it builds."""

from .base import FederatedMethod, WeightedMeanAccumulator
from .deer import DeerConfig, DeerMethod
from .ffa_lora import FFALoraConfig, FFALoraMethod
from .la_lora import LALoraConfig, LALoraMethod
from .lora import FedLoraConfig, FedLoraMethod
from .rolora import RoLoraConfig, RoLoraMethod

CONFIG_CLASSES: tuple[type[FedLoraConfig], ...] = (FedLoraConfig, FFALoraConfig, RoLoraConfig, DeerConfig, LALoraConfig)


def config_class_for(method_name: str) -> type[FedLoraConfig]:
    """The config class of a method, by the name recorded in a saved adapter's federated record."""
    for config_cls in CONFIG_CLASSES:
        if config_cls.method_class.name == method_name:
            return config_cls
    known = [c.method_class.name for c in CONFIG_CLASSES]
    raise ValueError(f"Unknown federated method {method_name!r}; this hf_fedlora knows {known}")


__all__ = [
    "CONFIG_CLASSES",
    "config_class_for",
    "DeerConfig",
    "DeerMethod",
    "FederatedMethod",
    "FedLoraConfig",
    "FedLoraMethod",
    "FFALoraConfig",
    "FFALoraMethod",
    "LALoraConfig",
    "LALoraMethod",
    "RoLoraConfig",
    "RoLoraMethod",
    "WeightedMeanAccumulator",
]
