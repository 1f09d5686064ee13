"""The vectorised RDP behind our PRV accountant gives Opacus's numbers: the same RDP, the same PRV epsilon."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant as OpacusPRVAccountant
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

from hf_fedlora.privacy import fast_rdp
from hf_fedlora.privacy.accountants import PRVAccountant, make_accountant

ORDERS = RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("q", [1e-4, 0.02, 0.3, 0.56, 0.95])
@pytest.mark.parametrize("sigma", [0.45, 1.0, 4.0])
def test_rdp_equals_opacus_at_every_default_order(q, sigma):
    ours = fast_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=3, orders=ORDERS)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=3, orders=ORDERS)
    # log A is a log of ~1 + tiny: both sums round at ~1e-16 absolute, so tiny RDP values agree absolutely.
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_edge_cases_follow_opacus():
    assert np.all(fast_rdp.compute_rdp(q=0.0, noise_multiplier=1.0, steps=5, orders=ORDERS) == 0)
    assert np.all(np.isinf(fast_rdp.compute_rdp(q=0.1, noise_multiplier=0.0, steps=5, orders=ORDERS)))
    full = fast_rdp.compute_rdp(q=1.0, noise_multiplier=2.0, steps=5, orders=ORDERS)
    np.testing.assert_allclose(full, np.asarray(ORDERS) / 8 * 5)


@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.02, 400)],
        [(0.6, 0.5, 40)],
        [(1.3, 0.01, 100), (0.9, 0.2, 7)],
        [(0.7, 0.56, 24)],  # the demo's smallest client (228 tweets) at the earlier logical batch 128
        [(0.7, 1.0, 3)],  # q = 1: the cdf's threshold log(1 - q) is -inf
        [(1.0, 0.08, 2)],  # a cross-device client's first round (benchmarks/scale.py --part rounds)
    ],
)
def test_prv_epsilon_is_opacus_prv_epsilon(history):
    ours, theirs = PRVAccountant(), OpacusPRVAccountant()
    ours.history, theirs.history = list(history), list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.get_epsilon(delta=1e-6)
    # The same computation, to rounding: numpy's vectorised exp/log (AVX-512 paths on some CPUs) and math's scalar
    # ones may differ in the last bit, so the epsilons agree to ~1e-15 relative, not always bit for bit.
    assert ours.get_epsilon(delta=1e-6) == pytest.approx(expected, rel=1e-12, abs=0)


def test_the_engine_uses_this_accountant():
    assert isinstance(make_accountant("prv"), PRVAccountant)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize(("sample_rate", "steps"), [(0.02, 120), (0.56, 24)])
def test_calibration_gives_opacus_noise_multiplier(accountant, sample_rate, steps):
    from opacus.accountants.utils import get_noise_multiplier

    from hf_fedlora.privacy.calibration import _bisect_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=8.0, target_delta=1e-6, sample_rate=sample_rate, steps=steps, accountant=accountant
        )
    assert _bisect_noise_multiplier(8.0, 1e-6, sample_rate, steps, accountant) == expected
