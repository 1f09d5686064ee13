"""Empirical privacy audit: a lower bound on epsilon from a membership-inference test on planted canaries.

What it does, in one training run per setting (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv:2305.08846):

1. Draw m canaries: random token sequences made of tokens no ordinary example uses (out of distribution), each
   with a uniformly random label out of 16, so only memorising a canary can make the model predict its label.
2. Flip a fair coin per canary, independently (S_i = +1: included, -1: held out). The included canaries join
   the ordinary examples of ONE client (`canary`); the held-out ones are never trained on.
3. Train through `FederatedTrainer` (non-private, or DP at a target epsilon with the DP randomness from OS
   entropy, as a real run).
4. Score every canary under the final global adapter: the log-probability of its planted label. Guess
   "included" for the k+ highest scores, "held out" for the k- lowest, abstain on the rest (r = k+ + k-
   guesses, v of them correct).
5. Turn (m, r, v) into a lower bound on epsilon at 95% confidence with the paper's Theorem 3 / Algorithm 2
   (`one_run_p_value`): if the run is (eps, delta)-DP with respect to each canary's presence, then
   P[v or more correct] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha. The bound is the
   smallest epsilon the test can no longer reject. Several (k+, k-) choices are tried, with a Bonferroni
   correction (each at significance 0.05 / their number), so picking the best afterwards stays valid.

What the bound means: with probability at least 95% over the coins and the training randomness, the true
epsilon of this training pipeline with respect to one canary (added or removed) is at least the bound. It is a
LOWER bound from one black-box attack on the final model: a DP run whose bound is far below its claimed
epsilon is consistent with the claim, it does not prove the claim is tight (one-run audits of a final model
are known to be loose). A bound above the claimed epsilon would falsify the claim. The non-private run shows
the test has power.

Assumptions of the analysis: the coins are independent fair coins, independent of everything else (drawn
here from a seeded generator that only the auditor uses); the guesses depend only on the released adapter
and public canary data; DP is with respect to adding or removing one canary (Opacus's Poisson-sampling
accountant is add/remove). The pipeline is audited as shipped: the canary client's noise is calibrated from
its size, which counts the included canaries, so sizes are treated as public (as
docs/algorithms.md#unit-one-example states). Only the canary client sees canaries; the other clients and the server
are post-processing.

    .venv/bin/python benchmarks/audit.py          # non-private and target epsilon 1, 4, 8 (RESULTS.md#privacy-audit)
    .venv/bin/python benchmarks/audit.py --quick  # smoke run: fewer canaries and rounds, audit_quick.json
"""

from __future__ import annotations

from common import TINY_VOCAB, format_table, quiet, set_threads, silence_printer, write_results

# isort: split

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import get_peft_model
from scipy import stats

from hf_fedlora import FederatedTrainer, FederatedTrainingArguments
from hf_fedlora.methods import FedLoraConfig

CONFIDENCE = 0.95
# Guess counts tried (k+, k-) as fractions of the canaries; Bonferroni over all of them.
GUESS_FRACTIONS = ((0.02, 0.0), (0.05, 0.0), (0.1, 0.0), (0.02, 0.02), (0.05, 0.05), (0.1, 0.1), (0.2, 0.2))
EPSILON_GRID_STEP = 0.01


# ----------------------------------------------------------------------------------------
# The one-run bound (Steinke, Nasr and Jagielski 2023)
# ----------------------------------------------------------------------------------------
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of v correct out of r guesses on m canaries if the run were (epsilon, delta)-DP.

    Steinke, Nasr, Jagielski 2023, Theorem 3 with Algorithm 2 (its appendix code): with q = e^eps/(1+e^eps),
    beta = P[Binomial(r, q) >= v] and alpha = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i,
    the p-value is min(1, beta + 2 m delta alpha).
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return float(_p_values(m, r, v, np.array([float(epsilon)]), delta)[0])


def _p_values(m: int, r: int, v: int, epsilons: np.ndarray, delta: float) -> np.ndarray:
    """`one_run_p_value` at many epsilons at once (the scan below needs hundreds)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"Need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = 1.0 / (1.0 + np.exp(-epsilons))
    beta = stats.binom.sf(v - 1, r, q)
    if delta == 0 or v == 0:
        return np.minimum(1.0, beta)
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i[None, :], r, q[:, None]), axis=1)  # P[v - i <= W < v]
    alpha = np.max(below / i, axis=1)
    return np.minimum(1.0, beta + 2 * m * delta * alpha)


def one_run_epsilon_bound(m: int, r: int, v: int, delta: float, significance: float = 1 - CONFIDENCE) -> float:
    """The smallest epsilon the one-run test cannot reject at `significance`: a lower bound on the true epsilon.

    The p-value is scanned upward from 0 on a grid (step 0.01) for the FIRST epsilon where it exceeds
    `significance`, and that step is refined the same way (three times, to 0.01 / 64^3), so the bound stays
    valid even if the p-value were not monotone in epsilon: every grid epsilon below the bound is rejected.
    """
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) > significance:
        return 0.0
    low, step = 0.0, EPSILON_GRID_STEP  # low: rejected, as is every grid point scanned below it
    while low <= 100:  # beyond: v = r with a huge r, overwhelming evidence; nothing more to learn
        grid = low + step * np.arange(1, 65)
        accepted = np.flatnonzero(_p_values(m, r, v, grid, delta) > significance)
        if not accepted.size:
            low = float(grid[-1])
            continue
        if accepted[0]:
            low = float(grid[accepted[0] - 1])
        if step < EPSILON_GRID_STEP / 64**2:
            return low
        step /= 64
    return math.inf


@dataclass
class AuditResult:
    """The best (k+, k-) guess of the audit, its bound and the statistics behind it."""

    epsilon_lower_bound: float
    confidence: float
    canaries: int
    included: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    true_positive_rate: float  # among included canaries: share guessed "included"
    false_positive_rate: float  # among held-out canaries: share guessed "included"
    hypotheses: int  # (k+, k-) choices tried; each tested at significance (1 - confidence) / hypotheses
    per_choice: list[dict[str, Any]] = field(default_factory=list)


def audit_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = CONFIDENCE,
    guess_fractions: Sequence[tuple[float, float]] = GUESS_FRACTIONS,
) -> AuditResult:
    """One-run audit of membership scores (higher = more likely included): the best bound over the guess counts.

    Each (k+, k-) = (fraction x m) is tested at significance (1 - confidence) / len(guess_fractions)
    (Bonferroni), so the largest of their bounds holds at `confidence`. Ties are broken by canary index,
    which carries no information about inclusion.
    """
    scores = np.asarray(scores, dtype=float)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be two equal-length vectors")
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest score first
    significance = (1 - confidence) / len(guess_fractions)
    choices = []
    for plus_fraction, minus_fraction in guess_fractions:
        k_plus, k_minus = int(plus_fraction * m), int(minus_fraction * m)
        if k_plus + k_minus > m:
            raise ValueError(f"guess fractions {plus_fraction} + {minus_fraction} exceed 1")
        guessed_in, guessed_out = order[:k_plus], order[m - k_minus :] if k_minus else order[:0]
        correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
        bound = one_run_epsilon_bound(m, k_plus + k_minus, correct, delta, significance)
        choices.append({"k_plus": k_plus, "k_minus": k_minus, "correct": correct, "epsilon_lower_bound": bound})
    best = max(choices, key=lambda c: c["epsilon_lower_bound"])
    guessed_in = np.zeros(m, dtype=bool)
    guessed_in[order[: best["k_plus"]]] = True
    held_out = max(1, int((~included).sum()))
    return AuditResult(
        epsilon_lower_bound=best["epsilon_lower_bound"],
        confidence=confidence,
        canaries=m,
        included=int(included.sum()),
        guesses=best["k_plus"] + best["k_minus"],
        correct=best["correct"],
        k_plus=best["k_plus"],
        k_minus=best["k_minus"],
        true_positive_rate=float((guessed_in & included).sum() / max(1, included.sum())),
        false_positive_rate=float((guessed_in & ~included).sum() / held_out),
        hypotheses=len(guess_fractions),
        per_choice=choices,
    )


# ----------------------------------------------------------------------------------------
# Canaries, the federated run, the scores
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One audited run: the federation, the training schedule and the privacy target."""

    canaries: int = 500
    canary_client_examples: int = 64  # ordinary examples beside the included canaries
    other_clients: int = 1
    other_client_examples: int = 64
    rounds: int = 3
    local_epochs: float = 20.0
    batch_size: int = 16
    learning_rate: float = 1e-2
    lora_r: int = 16
    target_modules: tuple[str, ...] = ("query", "key", "value")
    hidden_size: int = 64
    dropout: float = 0.0
    num_labels: int = 16  # many labels: a held-out canary's random label is rarely the one the model guesses
    seq_len: int = 16
    canary_vocab: int = 64  # tokens only canaries use, after the ordinary ones
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float = 1.0
    accountant: str = "prv"
    seed: int = 0

    @property
    def name(self) -> str:
        return "non-private" if self.target_epsilon is None else f"DP eps={self.target_epsilon:g}"


def ordinary_examples(n: int, setting: Setting, seed: int) -> dict[str, list]:
    """Random tokens whose label is decided by the first token (the task every client shares)."""

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (n, setting.seq_len), generator=generator)
    labels = (ids[:, 0] * setting.num_labels // TINY_VOCAB).clamp(max=setting.num_labels - 1)
    return {"input_ids": ids.tolist(), "attention_mask": [[1] * setting.seq_len] * n, "label": labels.tolist()}


def make_canaries(setting: Setting, seed: int) -> Dataset:
    """Out-of-distribution sequences (tokens no ordinary example uses) with uniformly random labels: no rule
    predicts a canary's label, so only memorising the canary itself can make the model predict it."""
    generator = torch.Generator().manual_seed(seed)
    shape = (setting.canaries, setting.seq_len)
    ids = torch.randint(TINY_VOCAB, TINY_VOCAB + setting.canary_vocab, shape, generator=generator)
    labels = torch.randint(0, setting.num_labels, (setting.canaries,), generator=generator)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * setting.seq_len] * setting.canaries,
            "label": labels.tolist(),
        }
    )


def planted_label_scores(model: torch.nn.Module, canaries: Dataset, batch_size: int = 256) -> np.ndarray:
    """Log-probability of each canary's planted label under the model (higher = looks more memorised)."""
    model.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(canaries), batch_size):
            rows = canaries[start : start + batch_size]
            logits = model(
                input_ids=torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"])
            ).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            scores.append(log_probs.gather(1, torch.tensor(rows["label"]).unsqueeze(1)).squeeze(1))
    return torch.cat(scores).numpy()


def audited_model(setting: Setting) -> torch.nn.Module:
    """A config-built BERT classifier (random weights: the "pretrained" model every client starts from) whose
    vocabulary also covers the canaries' tokens."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(setting.seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB + setting.canary_vocab,
        hidden_size=setting.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * setting.hidden_size,
        max_position_embeddings=setting.seq_len,
        num_labels=setting.num_labels,
        hidden_dropout_prob=setting.dropout,
        attention_probs_dropout_prob=setting.dropout,
    )
    return BertForSequenceClassification(config)


def run_setting(setting: Setting) -> dict[str, Any]:
    """Train once with randomly included canaries and audit the final global adapter."""
    canaries = make_canaries(setting, seed=10_000 + setting.seed)
    # The auditor's coins: independent of the data, the model and the DP randomness (OS entropy).
    included = np.random.default_rng([setting.seed, 2023]).random(setting.canaries) < 0.5
    ordinary = Dataset.from_dict(ordinary_examples(setting.canary_client_examples, setting, seed=setting.seed))
    clients = {"canary": concatenate_datasets([ordinary, canaries.select(np.flatnonzero(included))])}
    for index in range(setting.other_clients):
        examples = ordinary_examples(setting.other_client_examples, setting, seed=setting.seed + 1 + index)
        clients[f"client_{index + 1}"] = Dataset.from_dict(examples)
    torch.manual_seed(setting.seed)
    model = get_peft_model(
        audited_model(setting),
        FedLoraConfig(
            r=setting.lora_r,
            lora_alpha=2 * setting.lora_r,
            target_modules=list(setting.target_modules),
            task_type="SEQ_CLS",
            init_seed=setting.seed,
        ),
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = FederatedTrainingArguments(
            output_dir=output_dir,
            seed=setting.seed,
            num_rounds=setting.rounds,
            local_epochs=setting.local_epochs,
            per_device_train_batch_size=setting.batch_size,
            learning_rate=setting.learning_rate,
            aggregation_weights="uniform",  # the canary client counts as much as any other
            dp_target_epsilon=setting.target_epsilon,
            dp_target_delta=setting.delta,
            dp_clip_norm=setting.clip_norm,
            dp_accountant=setting.accountant,
            dp_secret_seed=None,  # DP randomness from OS entropy, as in a real run
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            save_strategy="no",
            logging_strategy="no",
        )
        trainer = silence_printer(FederatedTrainer(model=model, args=args, train_dataset=clients))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    scores = planted_label_scores(trainer.model, canaries)
    result = audit_scores(scores, included, delta=setting.delta)
    report = trainer.privacy_report()
    canary_privacy = report["clients"].get("canary", {}) if report.get("private") else {}
    return {
        "setting": setting.name,
        "claimed_epsilon": canary_privacy.get("epsilon"),
        "target_epsilon": setting.target_epsilon,
        "delta": setting.delta,
        "noise_multiplier": canary_privacy.get("noise_multiplier"),
        "sample_rate": canary_privacy.get("sample_rate"),
        "dp_steps": canary_privacy.get("steps"),
        "accountant": report.get("accountant"),
        "canary_client_examples": len(clients["canary"]),
        "train_seconds": seconds,
        "mean_score_included": float(scores[included].mean()),
        "mean_score_held_out": float(scores[~included].mean()),
        "config": asdict(setting),
        **asdict(result),
    }


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def parse_epsilon(text: str) -> float | None:
    """A target epsilon, or None for a non-private run ("none")."""
    if text.lower() in ("none", "inf", "nonprivate", "non-private"):
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"epsilon must be > 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Setting()
    parser.add_argument("--epsilons", type=parse_epsilon, nargs="+", default=[None, 1.0, 4.0, 8.0])
    parser.add_argument("--canaries", type=int, default=defaults.canaries)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--local_epochs", type=float, default=defaults.local_epochs)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--delta", type=float, default=defaults.delta)
    parser.add_argument("--accountant", default=defaults.accountant, choices=["prv", "rdp"])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared).")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 200 canaries, 2 rounds; audit_quick.json")
    args = parser.parse_args(argv)
    quiet()
    set_threads(args.threads)
    if args.quick:
        args.canaries, args.rounds = 200, 2
    rows, results = [], []
    for epsilon in args.epsilons:
        setting = Setting(
            canaries=args.canaries,
            rounds=args.rounds,
            local_epochs=args.local_epochs,
            learning_rate=args.learning_rate,
            target_epsilon=epsilon,
            delta=args.delta,
            accountant=args.accountant,
            seed=args.seed,
        )
        result = run_setting(setting)
        results.append(result)
        rows.append(
            [
                result["setting"],
                result["claimed_epsilon"] if result["claimed_epsilon"] is not None else "inf (no DP)",
                result["delta"],
                result["epsilon_lower_bound"],
                f"{result['correct']}/{result['guesses']} (k+={result['k_plus']}, k-={result['k_minus']})",
                result["true_positive_rate"],
                result["false_positive_rate"],
                f"{result['included']}/{result['canaries']}",
                result["train_seconds"],
            ]
        )
        print(f"{setting.name}: bound {result['epsilon_lower_bound']:.3f} ({result['train_seconds']:.0f} s)")
    headers = [
        "setting", "claimed eps", "delta", f"eps lower bound ({CONFIDENCE:.0%})", "correct/guesses",
        "TPR", "FPR", "canaries in/all", "train s",
    ]  # fmt: skip
    print()
    print(format_table(headers, rows))
    print(
        f"\nAnalysis: one-run audit (Steinke, Nasr, Jagielski 2023, Theorem 3), {len(GUESS_FRACTIONS)} guess counts "
        f"with a Bonferroni correction; a lower bound on epsilon at {CONFIDENCE:.0%} confidence, not an estimate."
    )
    name = "audit_quick" if args.quick else "audit"
    analysis = {
        "method": "one-run audit, Steinke, Nasr and Jagielski (NeurIPS 2023), Theorem 3 / Algorithm 2",
        "confidence": CONFIDENCE,
        "guess_fractions": GUESS_FRACTIONS,
        "correction": "Bonferroni over the guess fractions",
        "score": "log-probability of the canary's planted label under the final global adapter",
        "assumptions": "independent fair coins per canary; add/remove adjacency; client sizes public",
    }
    path = write_results(name, {"analysis": analysis, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
