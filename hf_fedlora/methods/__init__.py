"""One file per federated LoRA method: its config class, the method object it builds, and what the model card and
the demo say about it. Each is registered here, once, in the order the demo and the benchmarks list them."""

from .base import DefaultLearningRate, FederatedMethod, WeightedMeanAccumulator
from .deer import DeerConfig, DeerMethod
from .fedsvd import FedSVDConfig, FedSVDMethod
from .ffa_lora import FFALoraConfig, FFALoraMethod
from .la_lora import LALoraConfig, LALoraMethod
from .lora import FedLoraConfig, FedLoraMethod
from .registry import config_class_for, register_method, registered_config_classes, unregister_method
from .rolora import RoLoraConfig, RoLoraMethod

register_method(FedLoraConfig)
register_method(FFALoraConfig)
register_method(RoLoraConfig)
register_method(DeerConfig)
register_method(LALoraConfig)
register_method(FedSVDConfig)


def __getattr__(name: str):
    # CONFIG_CLASSES is read from the registry on every access, so methods registered later appear in it too.
    if name == "CONFIG_CLASSES":
        return registered_config_classes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONFIG_CLASSES",
    "config_class_for",
    "DeerConfig",
    "DeerMethod",
    "DefaultLearningRate",
    "FederatedMethod",
    "FedSVDConfig",
    "FedSVDMethod",
    "FedLoraConfig",
    "FedLoraMethod",
    "FFALoraConfig",
    "FFALoraMethod",
    "LALoraConfig",
    "LALoraMethod",
    "register_method",
    "registered_config_classes",
    "RoLoraConfig",
    "RoLoraMethod",
    "unregister_method",
    "WeightedMeanAccumulator",
]
