"""A diagnostic: FFA-LoRA with lora_B's and the head's learning rates scaled apart, on validation tweets.

Asks whether the recipe's one rate for both is what holds FFA-LoRA back: `--scale_b 0` trains the head alone
(B keeps its zero init), `--scale_b 0.1` lets B move ten times slower than the head, `--scale_head 0.4` slows the
head. `--b_from_round 2` trains the head alone in rounds 1-2 and lora_B with it from round 3 on (linear probing
then fine-tuning, LP-FT, inside the same steps and privacy budget). It patches `FFALoraMethod.learning_rate_scale`
(the hook LA-LoRA's and FFA-LoRA's lr_ratio_b use; `--scale_b 0.1` is what FFALoraConfig(lr_ratio_b=0.1), the
recipe's setting, does; the patch replaces lr_ratio_b, so `--scale_b` is lora_B's ratio whatever the config says)
for this process only and runs benchmarks/lr_sweep.py, whose flags pass through (validation split, recipe
defaults). `--score_on test` runs utility.py instead (its flags; the test tweets), for the verdict on a setting
already chosen on validation. Its runs: benchmarks/HISTORY.md#recipe-b96, #where-accuracy-is-lost and
#head-input-search.

    .venv/bin/python benchmarks/diagnostics/factor_rates.py --scale_b 0.1 --methods ffa_lora --rates 5e-2 \
        --name factor_b0.1
"""

from __future__ import annotations

import argparse

import benchmarks_path  # noqa: F401  (benchmarks/ on sys.path: lr_sweep.py, utility.py)

# isort: split

import lr_sweep
import utility

from hf_fedlora import FederatedTrainer
from hf_fedlora.federation.adapter_state import HEAD, LORA_B
from hf_fedlora.methods.ffa_lora import FFALoraMethod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale_b", type=float, default=1.0, help="lora_B's rate = this x --rates.")
    parser.add_argument("--scale_head", type=float, default=1.0, help="The head's rate = this x --rates.")
    parser.add_argument("--b_from_round", type=int, default=0, help="lora_B's rate is 0 before this round (0-based).")
    parser.add_argument(
        "--score_on",
        choices=["validation", "test"],
        default="validation",
        help="validation: lr_sweep.py (choose here); test: utility.py, the verdict on a choice already made.",
    )
    own, rest = parser.parse_known_args()
    scales = {LORA_B: own.scale_b, HEAD: own.scale_head}
    current_round = [0]
    local_round = FederatedTrainer.local_round

    def tracking_local_round(self, name, round_index, sub_round, steps):
        current_round[0] = round_index  # the optimizer of this client-round is built inside, after this
        return local_round(self, name, round_index, sub_round, steps)

    def learning_rate_scale(self, factor):
        if factor == LORA_B and current_round[0] < own.b_from_round:
            return 0.0
        return scales.get(factor, 1.0)

    FederatedTrainer.local_round = tracking_local_round
    FFALoraMethod.learning_rate_scale = learning_rate_scale
    if own.score_on == "test":
        utility.main(rest)
    else:
        lr_sweep.main(rest)


if __name__ == "__main__":
    main()
