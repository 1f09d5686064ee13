"""The registry of federated methods: one `register_method(ConfigClass)` call per method.

As `peft.utils.register_peft_method` makes a tuner known to PEFT, registering a method's config class makes the
method known to everything that looks methods up by name: loading a saved adapter's config, the example scripts'
`--method`, the demo and the model card. What the card and the demo say about a method is read from its method
class (`FederatedMethod`'s class attributes), checked here once, so a method is one file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import fields, is_dataclass

from .base import DefaultLearningRate, FederatedMethod
from .lora import FedLoraConfig

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_REGISTRY: dict[str, type[FedLoraConfig]] = {}


def register_method(config_cls: type[FedLoraConfig]) -> type[FedLoraConfig]:
    """Make a method known by its `method_class.name`; returns the class, so it also works as a decorator.

    Fails with a message naming the attribute to fix when the method's description is incomplete or its name is
    taken: a half-described method would print an empty card.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, FedLoraConfig) and is_dataclass(config_cls)):
        raise ValueError(f"register_method takes a @dataclass subclass of FedLoraConfig, got {config_cls!r}")
    method = getattr(config_cls, "method_class", None)
    if not (isinstance(method, type) and issubclass(method, FederatedMethod)):
        raise ValueError(f"{config_cls.__name__}.method_class must be a FederatedMethod subclass, got {method!r}")
    where = f"{method.__name__} (the method of {config_cls.__name__})"
    name = method.name
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == FederatedMethod.name:
        raise ValueError(
            f"{where}.name must be a lower-case identifier other than {FederatedMethod.name!r} (e.g. 'my_lora'), "
            f"got {name!r}"
        )
    if name in _REGISTRY:
        raise ValueError(
            f"A method named {name!r} is already registered ({_REGISTRY[name].__name__}): give {where} another "
            "name, or unregister_method the old one first"
        )
    for attribute in ("display_name", "description"):
        value = getattr(method, attribute)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}.{attribute} must be a non-empty string (the card prints it), got {value!r}")
    citation = method.citation
    if citation is not None and not (isinstance(citation, str) and citation.lstrip().startswith("@")):
        raise ValueError(f"{where}.citation must be a BibTeX entry ('@article{{...}}') or None, got {citation!r}")
    rate = method.recipe_learning_rate
    if rate is not None and not (
        isinstance(rate, DefaultLearningRate)
        and isinstance(rate.value, (int, float))
        and math.isfinite(rate.value)
        and rate.value > 0
        and rate.source.strip()
    ):
        raise ValueError(
            f"{where}.recipe_learning_rate must be None (not tuned) or DefaultLearningRate(value > 0, source saying "
            f"where the number came from), got {rate!r}"
        )
    settings = method.recipe_settings
    if not isinstance(settings, Mapping):
        raise ValueError(f"{where}.recipe_settings must be a mapping of config fields to values, got {settings!r}")
    unknown = sorted(set(settings) - {f.name for f in fields(config_cls) if f.init})
    if unknown:
        raise ValueError(f"{where}.recipe_settings names {unknown}, which are not fields of {config_cls.__name__}")
    _REGISTRY[name] = config_cls
    return config_cls


def unregister_method(name: str) -> None:
    """Forget a registered method (for tests and for replacing a method with another of the same name)."""
    if name not in _REGISTRY:
        raise ValueError(f"No method named {name!r} is registered; registered methods: {list(_REGISTRY)}")
    del _REGISTRY[name]


def registered_config_classes() -> tuple[type[FedLoraConfig], ...]:
    """Every registered method's config class, in registration order."""
    return tuple(_REGISTRY.values())


def config_class_for(method_name: str) -> type[FedLoraConfig]:
    """The config class of a method, by the name recorded in a saved adapter's federated record."""
    if method_name not in _REGISTRY:
        raise ValueError(f"Unknown federated method {method_name!r}; this hf_fedlora knows {list(_REGISTRY)}")
    return _REGISTRY[method_name]
