"""Privacy lives here and only here: DP-SGD with Opacus, accountants, calibration, the report."""

from .accountants import ACCOUNTANTS, epsilon_from_history, make_accountant
from .calibration import calibrate_noise_multiplier
from .engine import UNIT, ClientPrivacy, FederatedPrivacy
from .model_checks import check_dp_trainable, check_no_batch_statistics, check_trainable_is_federated
from .per_example_gradients import PerExampleGradients, check_supported

__all__ = [
    "ACCOUNTANTS",
    "UNIT",
    "ClientPrivacy",
    "FederatedPrivacy",
    "PerExampleGradients",
    "calibrate_noise_multiplier",
    "check_dp_trainable",
    "check_no_batch_statistics",
    "check_supported",
    "check_trainable_is_federated",
    "epsilon_from_history",
    "make_accountant",
]
