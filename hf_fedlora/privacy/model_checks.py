"""Models whose per-example gradients would not be per-example, or would not exist: refused before training."""

from __future__ import annotations

from torch import nn

from ..federation.adapter_state import factor_of


def check_no_batch_statistics(model: nn.Module) -> None:
    """BatchNorm in train mode normalises by the batch's statistics, trainable or frozen, so one example's
    gradient depends on the others of its batch and per-example clipping no longer bounds its influence."""
    found = [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if found:
        raise ValueError(
            f"Under DP every example's gradient must depend on that example alone, but {', '.join(found[:5])} "
            "normalise by batch statistics in training mode. Replace them (e.g. by GroupNorm or LayerNorm; "
            "opacus.validators.ModuleValidator.fix does this), or train without DP."
        )


def check_trainable_is_federated(model: nn.Module) -> None:
    """Every trainable parameter must belong to the federated adapter (LoRA factors and modules_to_save): that is
    all a client steps, sends and averages (`adapter_parameters`). Anything else PEFT leaves trainable (biases with
    bias='all' or 'lora_only', parameters unfrozen by hand) would get gradients but never be trained."""
    bias = _adapter_setting(model, "bias")
    if bias not in (None, "none"):
        raise ValueError(
            f"The adapter config has bias={bias!r}, which makes base-model biases trainable, but a federated client "
            "trains, sends and averages only the LoRA factors and the modules_to_save: those biases would never be "
            "trained (under DP, Opacus also fails on them). Use bias='none' (a module in modules_to_save is trained "
            "whole, bias included)."
        )
    stray = [
        name for name, parameter in model.named_parameters() if parameter.requires_grad and factor_of(name) is None
    ]
    if stray:
        raise ValueError(
            f"{len(stray)} trainable parameter(s) are outside the federated adapter (LoRA factors and "
            f"modules_to_save), e.g. {', '.join(stray[:3])}: a client would never step, send or average them. "
            "Freeze them (parameter.requires_grad_(False)), or add their modules to modules_to_save."
        )


def check_dp_trainable(model: nn.Module) -> None:
    """What DP-SGD cannot train, refused before training instead of failing at the first step.

    Opacus records a per-example gradient in the forward and backward hooks of the module that holds a parameter.
    PEFT's LoRA on an embedding layer keeps its factors (lora_embedding_A / lora_embedding_B) in parameter
    containers, whose forward never runs, so they never get one ("Per sample gradient is not initialized").
    """
    check_trainable_is_federated(model)
    held = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in model.named_modules()
        if isinstance(module, (nn.ParameterDict, nn.ParameterList))
        for name, _ in module.named_parameters(recurse=False)
    }
    untrainable = [
        name
        for name, parameter in model.named_parameters()
        if name in held and (parameter.requires_grad or factor_of(name) is not None)
    ]
    if not untrainable:
        return
    embeddings = sorted({name.split(".lora_embedding_")[0] for name in untrainable if ".lora_embedding_" in name})
    if embeddings:
        targets = sorted({module.rsplit(".", 1)[-1] for module in embeddings})
        raise ValueError(
            f"Under DP, LoRA on an embedding layer cannot be trained: Opacus has no per-example gradient for "
            f"PEFT's LoRA embedding factors (lora_embedding_A / lora_embedding_B of {', '.join(embeddings)}). "
            f"Remove the embedding module ({', '.join(targets)}) from target_modules, or train without DP."
        )
    raise ValueError(
        f"Under DP these adapter parameters cannot be trained: {', '.join(untrainable[:3])} are held in a "
        "parameter container whose forward never runs, so Opacus records no per-example gradient for them. "
        "Remove their module from target_modules / modules_to_save, or train without DP."
    )


def _adapter_setting(model: nn.Module, name: str) -> object:
    """A setting of the model's active PEFT adapter config, or None without one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    config = configs.get(getattr(model, "active_adapter", None)) or next(iter(configs.values()), None)
    return getattr(config, name, None)
