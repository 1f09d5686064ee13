"""The empirical privacy audit (benchmarks/audit.py): its bound is the published one-run bound, it is valid
(a mechanism with a known epsilon is not over-claimed), and on real training it has power without DP and
stays below the claimed epsilon with DP."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import audit  # noqa: E402  (benchmarks/audit.py)


def _logistic(epsilon: float) -> float:
    return 1 / (1 + math.exp(-epsilon))


def test_p_value_matches_the_closed_form_of_theorem_3():
    # r = v = 2 by hand: beta = q^2; alpha = max(P[W = 1] / 1, P[0 <= W <= 1] / 2) with W ~ Binomial(2, q).
    for epsilon in (0.0, 0.7, 2.0):
        q = _logistic(epsilon)
        assert audit.one_run_p_value(10, 2, 2, epsilon, 0.0) == pytest.approx(q**2)
        alpha = max(2 * q * (1 - q), (1 - q**2) / 2)
        assert audit.one_run_p_value(10, 2, 2, epsilon, 1e-3) == pytest.approx(q**2 + 2 * 10 * 1e-3 * alpha)
    # All wrong: every epsilon explains it.
    assert audit.one_run_p_value(10, 4, 0, 3.0, 0.0) == 1.0


def test_bound_for_all_correct_guesses_is_the_randomized_response_epsilon():
    # v = r = 10, delta = 0: p(eps) = q^10, so the bound solves q^10 = 0.05: q = 0.05^(1/10), eps = logit(q).
    q = 0.05 ** (1 / 10)
    expected = math.log(q / (1 - q))
    assert audit.one_run_epsilon_bound(100, 10, 10, 0.0, 0.05) == pytest.approx(expected, abs=1e-6)
    # delta > 0 can only make the evidence weaker.
    assert audit.one_run_epsilon_bound(100, 10, 10, 1e-3, 0.05) < expected


def test_bound_grows_with_the_evidence_and_is_zero_at_chance():
    assert audit.one_run_epsilon_bound(1000, 100, 50, 1e-5) == 0.0  # coin-flip accuracy proves nothing
    bounds = [audit.one_run_epsilon_bound(1000, 100, v, 1e-5) for v in (60, 70, 80, 90, 100)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    # More guesses at the same accuracy are stronger evidence.
    assert audit.one_run_epsilon_bound(1000, 400, 360, 1e-5) > audit.one_run_epsilon_bound(1000, 100, 90, 1e-5)


def test_audit_never_over_claims_a_mechanism_with_known_epsilon():
    # Randomized response on each canary's coin is exactly eps-DP; its scores are the noisy coins. Over 200
    # independent audits, the 95% lower bound may exceed the true epsilon in at most about 5% of them.
    rng = np.random.default_rng(0)
    true_epsilon, m, trials = 1.0, 400, 200
    exceed = 0
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < _logistic(true_epsilon)
        scores = np.where(truthful == included, 1.0, -1.0) + 1e-6 * rng.random(m)  # jitter: random tie-breaks
        result = audit.audit_scores(scores, included, delta=1e-5)
        bounds.append(result.epsilon_lower_bound)
        exceed += result.epsilon_lower_bound > true_epsilon
    assert exceed / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    assert np.median(bounds) > 0.3  # and the test has power: it sees most of the true epsilon


def test_audit_scores_counts_guesses_and_rates():
    # 4 of 8 canaries included; scores rank the included ones first except one swap.
    included = np.array([True, True, True, True, False, False, False, False])
    scores = np.array([8, 7, 6, 3, 5, 2, 1, 0], dtype=float)
    result = audit.audit_scores(scores, included, delta=0.0, guess_fractions=[(0.5, 0.0), (0.25, 0.25)])
    by_choice = {(c["k_plus"], c["k_minus"]): c["correct"] for c in result.per_choice}
    assert by_choice == {(4, 0): 3, (2, 2): 4}
    assert result.hypotheses == 2 and result.canaries == 8 and result.included == 4
    if result.k_plus == 4:
        assert (result.true_positive_rate, result.false_positive_rate) == (0.75, 0.25)


SMALL = dict(canaries=200, canary_client_examples=32, other_client_examples=32, rounds=2, accountant="rdp")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two spin-waiting threads make tiny steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_non_private_memorising_run_gives_a_bound_dp_would_forbid(one_thread):
    result = audit.run_setting(audit.Setting(**SMALL))
    assert result["claimed_epsilon"] is None
    assert result["epsilon_lower_bound"] > 1.0, result


@pytest.mark.slow
def test_dp_run_stays_below_its_claimed_epsilon(one_thread):
    # The same run non-private clears 1.0 (test above), so a DP step that leaked would show here.
    result = audit.run_setting(audit.Setting(**SMALL, target_epsilon=1.0))
    assert result["claimed_epsilon"] == pytest.approx(1.0, abs=0.01)
    assert result["epsilon_lower_bound"] <= result["claimed_epsilon"], result
