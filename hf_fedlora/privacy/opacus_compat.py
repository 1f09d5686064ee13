"""Every piece of Opacus this package uses, behind one module, with the versions it was checked against.

Some of these are Opacus internals (underscored names, the PRV analysis): a new Opacus may move or change them
without notice, so an untested version is refused at import with a message that says what to install, rather than
failing half-way through a private run. The per-example gradient hooks, the DP optimizer, the accountants and the
noise all come through here.
"""

from __future__ import annotations

import importlib.metadata

import torch
from opacus.accountants import IAccountant, RDPAccountant
from opacus.accountants import PRVAccountant as OpacusPRVAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

SUPPORTED = ((1, 5), (1, 6))  # major.minor versions whose internals these imports were checked against


def _check_version() -> None:
    version = importlib.metadata.version("opacus")
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if major_minor not in SUPPORTED:
        checked = ", ".join(".".join(map(str, v)) for v in SUPPORTED)
        raise ImportError(
            f"hf_fedlora uses Opacus internals checked with Opacus {checked}; found {version}. Install a supported "
            "version (pip install 'opacus>=1.5,<1.7')."
        )


_check_version()


def give_empty_batch(parameters: list[torch.nn.Parameter]) -> None:
    """An empty Poisson batch still takes a (pure-noise) step: Opacus's optimizer needs a per-example gradient with
    zero rows on every trainable parameter to clip, sum (to zero) and noise."""
    for parameter in parameters:
        parameter.grad_sample = torch.zeros((0, *parameter.shape), device=parameter.device)


def secure_normal(std: float, reference: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gaussian noise robust to floating-point attacks on the sampler (Opacus's secure_mode draw: the mean of four
    draws scaled to the std, after one discarded draw; Holohan et al. 2021)."""
    return _generate_noise(std, reference, generator=generator, secure_mode=True)


__all__ = [
    "DPOptimizer",
    "Domain",
    "GradSampleHooks",
    "IAccountant",
    "OpacusPRVAccountant",
    "PoissonSubsampledGaussianPRV",
    "RDPAccountant",
    "TruncatedPrivacyRandomVariable",
    "_check_processed_flag",
    "_mark_as_processed",
    "compose_heterogeneous",
    "discretize",
    "give_empty_batch",
    "opacus_rdp",
    "secure_normal",
]
