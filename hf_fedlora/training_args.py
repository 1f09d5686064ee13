"""`FederatedTrainingArguments`: `TrainingArguments` plus rounds, clients, partition and the DP budget."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from transformers import SchedulerType, TrainingArguments

from .federation.partition import SCHEMES
from .lr_schedule import check_schedule
from .privacy import ACCOUNTANTS
from .privacy.client_level import DISTRIBUTED_RELATION_ERROR, NEIGHBOURING_RELATIONS, NOISE_PLACEMENTS, PUBLIC_ROSTER
from .privacy.dp_optimizer import CLIPPINGS
from .privacy.engine import CALIBRATIONS, UNITS

SECRET_MASK = "<DP_SECRET_SEED>"
PARTITIONS = SCHEMES
AGGREGATION_WEIGHTS = ("num_examples", "uniform")
NOISE_CALIBRATIONS = CALIBRATIONS


@dataclass
class FederatedTrainingArguments(TrainingArguments):
    """Arguments for `FederatedTrainer`.

    A client's logical batch is `per_device_train_batch_size` x `gradient_accumulation_steps`
    (Trainer's convention: per_device is the physical micro-batch that fits in memory); under DP
    the logical batch is the expected Poisson batch and sets q_k = logical / n_k, and each
    logical batch is one noisy step however many micro-batches it takes. The usual `learning_rate`, `optim`,
    `lr_scheduler_type` (default constant; a schedule runs over the whole federation), `weight_decay`,
    `eval_strategy`-free evaluation (`eval_every_rounds`), `report_to`,
    `seed` and `output_dir` apply. `num_train_epochs` and `max_steps` are not used: the
    length of a run is `num_rounds` x local steps. `save_strategy`/`save_steps` count rounds
    ("epoch" = every round), and so does `logging_steps` (default 1: the epsilon spent is logged every round;
    rounds not logged skip the accountant call); each checkpoint holds the global adapter, its card and the run's
    record. With `push_to_hub`, `hub_strategy="end"` pushes on `save_model()`/`push_to_hub()`
    only; any other strategy also pushes the global adapter at every checkpoint (checkpoint
    folders themselves are not pushed).
    """

    # --- federation -------------------------------------------------------------------
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={
            "help": "Trainer's schedule, run over the whole federation: the rate at local step s of round r is the "
            "schedule's at step r x local steps + s of num_rounds x local steps (warmup_steps likewise). Default "
            "constant, as the papers train; 'linear' or 'cosine' decay to the last round. Not reduce_lr_on_plateau."
        },
    )
    num_rounds: int = field(default=10, metadata={"help": "Communication rounds."})
    logging_steps: float = field(
        default=1,
        metadata={
            "help": "Rounds between logs of the epsilon spent so far (a round is a step; < 1: a ratio of "
            "num_rounds). The last round always logs it."
        },
    )
    num_clients: int | None = field(
        default=None,
        metadata={
            "help": "Clients to split train_dataset into (iid, dirichlet). Inferred when the clients are given "
            "ready-made, from label_proportions, or from client_column."
        },
    )
    clients_per_round: int | None = field(
        default=None, metadata={"help": "Clients sampled uniformly, without replacement, per round. Default: all."}
    )
    local_steps: int | None = field(
        default=None,
        metadata={"help": "Local optimizer steps per client per (sub-)round. Exclusive with local_epochs."},
    )
    local_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Local passes over the client's shard per (sub-)round, in expected examples "
            "(ceil(local_epochs * n_k / batch size) steps). Default 1 when local_steps is not set."
        },
    )
    aggregation_weights: str = field(
        default="num_examples",
        metadata={
            "help": f"Server weights p_k: one of {AGGREGATION_WEIGHTS} (renormalised over participants). Not used "
            "under dp_unit='client': DP-FedAvg counts every client's clipped update once and divides by the "
            "expected count."
        },
    )
    min_clients_per_round: int | None = field(
        default=None,
        metadata={
            "help": "Tolerate failing clients: a (sub-)round still aggregates the clients that finished if at least "
            "min(this, the round's participants) did (the failed clients' spent privacy stays counted), else training "
            "stops with an error. Default: None, any client failure stops training. The same rule in process and "
            "under Flower (run config min-clients-per-round)."
        },
    )
    eval_every_rounds: int = field(
        default=1, metadata={"help": "Evaluate the global adapter on eval_dataset every N rounds (and after the last)."}
    )
    # --- partition of a single train_dataset -------------------------------------------
    partition: str = field(
        default="iid", metadata={"help": f"How to split one train_dataset among clients: one of {PARTITIONS}."}
    )
    partition_seed: int | None = field(default=None, metadata={"help": "Seed of the partition. Default: seed."})
    partition_min_size: int | None = field(
        default=None,
        metadata={
            "help": "Fewest examples a client of a split train_dataset may hold (Flower Datasets' min_partition_size). "
            "A dirichlet split below it re-draws the label proportions (a bounded number of times; the record says "
            "how many draws); any other scheme below it is refused. Default: under example-level DP the logical "
            "batch (a smaller client's Poisson rate would exceed 1), else 1 (no empty client)."
        },
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column for label-based partitions and histograms (auto: label/labels)."}
    )
    dirichlet_alpha: float = field(
        default=0.5, metadata={"help": "Concentration of the Dirichlet label skew; smaller is more skewed."}
    )
    label_proportions: str | None = field(
        default=None,
        metadata={
            "help": "JSON list of per-client label shares, e.g. '[[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]': row k is "
            "client k, column c the c-th label; each label's examples are split in proportion to its column."
        },
    )
    client_column: str | None = field(
        default=None, metadata={"help": "Column holding a natural client id (partition='column')."}
    )
    # --- differential privacy ----------------------------------------------------------
    dp_unit: str = field(
        default="example",
        metadata={
            "help": "Unit of privacy, one of ('example', 'client'). 'example': DP-SGD inside each client, epsilon "
            "per training example. 'client': DP-FedAvg (McMahan et al., 2018): clients train without per-example "
            "clipping; each sampled client's whole round update is clipped to dp_clip_norm, the aggregator adds "
            "Gaussian noise once to the sum and divides by the expected count clients_per_round; accounted over "
            "rounds at the client-sampling rate clients_per_round / num_clients; epsilon for all of one client's "
            "data. The aggregator sees the clipped updates before the noise (central DP)."
        },
    )
    dp_neighbouring_relation: str = field(
        default="add_or_remove_one",
        metadata={
            "help": f"Under dp_unit='client', which datasets are neighbours, one of {NEIGHBOURING_RELATIONS} (as "
            "Flower's PrivacyConfig names them). 'add_or_remove_one': clients take part by secret Poisson sampling; "
            "client names, sizes, per-round participant counts and failures are never published. 'replace_one': the "
            "client list is public; replacing one client's data moves the sum by up to 2 x dp_clip_norm, which is "
            "accounted; every client takes part in every round. 'zero_out_one': the client list is public and every "
            "client takes part in every round; removing one client's data leaves it sending a zero update (and under "
            "dp_noise_placement='distributed' its noise share), which moves the sum by up to dp_clip_norm."
        },
    )
    secure_aggregation: bool = field(
        default=False,
        metadata={
            "help": "Average the uploads through a secure sum, so the server learns their weighted mean and nothing "
            "of any one upload (hf_fedlora.federation.secure_mean): each client sends its update (upload minus the "
            "global adapter), every coordinate clipped to +-secure_aggregation_range, weighted and rounded to a "
            "grid, modulo 2^secure_sum_bits. For the example unit and non-private runs; under dp_unit='client' "
            "use dp_noise_placement='distributed'. Under Flower the sum is SecAgg across the SuperNodes; in "
            "process it is simulated (the same arithmetic, without masks)."
        },
    )
    secure_aggregation_range: float = field(
        default=1.0,
        metadata={
            "help": "Under secure_aggregation, the clipping range c of each coordinate of a client's round update "
            "(public; choose it above the largest change one round can make)."
        },
    )
    dp_noise_placement: str = field(
        default="central",
        metadata={
            "help": "Under dp_unit='client', who adds the noise, one of ('central', 'distributed'). 'central': the "
            "aggregator adds it to the sum of clipped updates (it sees the updates before the noise). 'distributed': "
            "each client adds its share of discrete Gaussian noise to its update, encoded as integers modulo "
            "2^secure_sum_bits for a secure sum, so the aggregator learns only the noised sum (Kairouz et al., "
            "2021; docs/algorithms.md#distributed-noise). Needs dp_neighbouring_relation='zero_out_one' or "
            "'replace_one'. The noise is planned for min_clients_per_round surviving "
            "clients (default: all); every client takes part in every round. In process the secure sum is "
            "simulated: the same modular arithmetic, without the masks that hide each upload."
        },
    )
    secure_sum_bits: int = field(
        default=20,
        metadata={
            "help": "Bits per coordinate of a secure sum (dp_noise_placement='distributed' or secure_aggregation), "
            "8-48: more bits, a finer grid (and under distributed noise an epsilon closer to the Gaussian's)."
        },
    )
    dp_target_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Target epsilon per client (unit: one example). Each client's noise multiplier is calibrated "
            "before training so it just meets it. Exclusive with dp_noise_multiplier. Unset (with "
            "dp_noise_multiplier unset) means a non-private run."
        },
    )
    dp_target_delta: float = field(
        default=1e-5,
        metadata={
            "help": "Delta of the guarantee; refused unless below 1/n for every client, with a warning above 0.1/n."
        },
    )
    dp_noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "Noise multiplier sigma for every client, set directly (epsilon is then only reported)."},
    )
    dp_clip_norm: float = field(
        default=1.0, metadata={"help": "Per-example clipping norm C (the sensitivity the noise is scaled to)."}
    )
    dp_clipping: str = field(
        default="flat",
        metadata={
            "help": "How an example's gradient is clipped to dp_clip_norm, as Opacus's `clipping`: 'flat' (all "
            "trainable tensors together) or 'per_layer' (each of the P trainable tensors on its own to "
            "dp_clip_norm / sqrt(P), so every tensor, a LoRA factor as much as the classifier head, gets an equal "
            "share of the sensitivity; the guarantee is the same). Under the client unit, the same over the "
            "tensors of the round update."
        },
    )
    dp_fp16_loss_scale: float = field(
        default=256.0,
        metadata={
            "help": "With fp16=True under per-example DP: the fixed loss scale the summed loss is multiplied by "
            "before backward (so small gradients do not underflow in fp16) and each example's gradient is divided "
            "by, in float32, before its norm. Fixed and public, not GradScaler's: a scale that adapts to overflows "
            "would depend on secret examples. An example whose gradient overflows contributes zero, unobserved "
            "(benchmarks/RESULTS.md#fp16-loss-scale: 256 loses nothing on MiniLM; 65536 drops most examples once the "
            "head is confident). Without DP, or under the client unit, fp16 uses a fresh GradScaler per client round."
        },
    )
    dp_secret_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the DP randomness (Poisson batch sampling and noise), for reproducible experiments "
            "only: whoever knows it can rebuild every batch and remove the noise, so the guarantee then holds only "
            "while it stays secret. Never written to the record, the card or report_to. Default: fresh OS entropy."
        },
    )
    dp_secure_mode: bool = field(
        default=False,
        metadata={
            "help": "Draw every DP batch and noise tensor from a fresh generator seeded by OS entropy, with the "
            "noise robust to floating-point attacks on the Gaussian sampler (as Opacus's secure_mode: the mean of "
            "four draws). No generator state exists that could regenerate the noise. Slower noise; not with "
            "dp_secret_seed."
        },
    )
    dp_accountant: str = field(
        default="prv", metadata={"help": f"Privacy accountant: one of {sorted(ACCOUNTANTS)} (PRV is tighter)."}
    )
    dp_new_privacy_budget: bool = field(
        default=False,
        metadata={
            "help": "Continue an adapter that was already trained under a recorded run with a fresh privacy budget, "
            "instead of composing with what that run spent. Only right when this run's data are disjoint from that "
            "run's; the card then says so."
        },
    )
    publish_unprotected_statistics: bool = field(
        default=False,
        metadata={
            "help": "Under DP, also send the clients' training losses to the server and publish them and the "
            "per-client label histograms in the record and the card, listed there as NOT covered by the guarantee. "
            "Off by default: a private run publishes only what the guarantee covers."
        },
    )
    hyperparameter_selection: str | None = field(
        default=None,
        metadata={
            "help": "How this run's settings (learning rate, batch, rounds, ...) were chosen, printed on the model "
            "card. Choices made by runs on the private training data are outside the guarantee (Papernot and "
            "Steinke, 2022): say so here. Unset, the card says that it does not know."
        },
    )
    dp_noise_calibration: str = field(
        default="per_client",
        metadata={
            "help": f"One of {NOISE_CALIBRATIONS}: each client its own noise just meeting the target; one "
            "shared noise set by the worst-placed client (more noise for everyone else); or, for many clients, "
            "the noise of the geometric grid point (sample rate, steps; ratio 1.25) just above each client's own "
            "(one calibration per occupied grid point, every client still within the target)."
        },
    )

    def __post_init__(self) -> None:
        self._check_types()
        super().__post_init__()
        self._check_federation()
        self._check_privacy()
        check_schedule(self)

    def to_dict(self) -> dict:
        """As Trainer's, with the secret DP seed hidden: this dict reaches report_to and saved arguments."""
        d = super().to_dict()
        if d.get("dp_secret_seed") is not None:
            d["dp_secret_seed"] = SECRET_MASK
        return d

    def __str__(self) -> str:
        """As Trainer's (which prints every field), with the secret DP seed hidden: arguments reach logs."""
        text = super().__str__()  # one "name=value," line per field
        return text.replace(f"\ndp_secret_seed={self.dp_secret_seed},", f"\ndp_secret_seed={SECRET_MASK},")

    __repr__ = __str__

    @property
    def private(self) -> bool:
        return self.dp_target_epsilon is not None or self.dp_noise_multiplier is not None

    @property
    def effective_partition_min_size(self) -> int:
        """partition_min_size, else the logical batch under example-level DP (q = batch / n must stay <= 1), else 1."""
        if self.partition_min_size is not None:
            return self.partition_min_size
        if self.private and self.dp_unit == "example":
            return self.per_device_train_batch_size * self.gradient_accumulation_steps
        return 1

    def parsed_label_proportions(self) -> list[list[float]] | None:
        if self.label_proportions is None or isinstance(self.label_proportions, list):
            return self.label_proportions
        return json.loads(self.label_proportions)

    def _check_types(self) -> None:
        """Numbers given as the wrong type (e.g. a string epsilon) fail here, by name, not deep inside a library."""
        for name in ("dp_target_epsilon", "dp_noise_multiplier"):
            _require_finite_number(getattr(self, name), name, optional=True)
        for name in ("dp_target_delta", "dp_clip_norm", "dp_fp16_loss_scale"):
            _require_finite_number(getattr(self, name), name)
        _require_int(self.seed, "seed", minimum=0)
        if self.dp_secret_seed is not None:
            _require_int(self.dp_secret_seed, "dp_secret_seed", minimum=0)
        if self.partition_seed is not None:
            _require_int(self.partition_seed, "partition_seed", minimum=0)
        _require_int(self.per_device_train_batch_size, "per_device_train_batch_size", minimum=1)
        _require_int(self.per_device_eval_batch_size, "per_device_eval_batch_size", minimum=1)

    def _check_federation(self) -> None:
        _require_int(self.num_rounds, "num_rounds", minimum=1)
        if self.num_clients is not None:
            _require_int(self.num_clients, "num_clients", minimum=1)
        if self.clients_per_round is not None:
            _require_int(self.clients_per_round, "clients_per_round", minimum=1)
            if self.num_clients is not None and self.clients_per_round > self.num_clients:
                raise ValueError(f"clients_per_round={self.clients_per_round} exceeds num_clients={self.num_clients}")
        if self.min_clients_per_round is not None:
            _require_int(self.min_clients_per_round, "min_clients_per_round", minimum=1)
        if self.local_steps is not None and self.local_epochs is not None:
            raise ValueError("Set local_steps or local_epochs, not both")
        if self.local_steps is not None:
            _require_int(self.local_steps, "local_steps", minimum=1)
        if self.local_epochs is not None and not self.local_epochs > 0:
            raise ValueError(f"local_epochs must be > 0, got {self.local_epochs}")
        _require_choice(self.aggregation_weights, "aggregation_weights", AGGREGATION_WEIGHTS)
        _require_int(self.eval_every_rounds, "eval_every_rounds", minimum=1)
        _require_choice(self.partition, "partition", PARTITIONS)
        if self.partition_min_size is not None:
            _require_int(self.partition_min_size, "partition_min_size", minimum=1)
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.label_proportions is not None and not isinstance(self.label_proportions, list):
            try:
                json.loads(self.label_proportions)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"label_proportions must be a JSON list of lists, got {self.label_proportions!r}: {error}"
                ) from error

    def _check_privacy(self) -> None:
        if self.dp_target_epsilon is not None and self.dp_noise_multiplier is not None:
            raise ValueError(
                "Set dp_target_epsilon or dp_noise_multiplier, not both: with a target, each client's noise "
                "multiplier is calibrated to meet it"
            )
        if self.dp_target_epsilon is not None and not self.dp_target_epsilon > 0:
            raise ValueError(f"dp_target_epsilon must be > 0, got {self.dp_target_epsilon}")
        if not 0 < self.dp_target_delta < 1:
            raise ValueError(f"dp_target_delta must be in (0, 1), got {self.dp_target_delta}")
        if self.dp_noise_multiplier is not None and not self.dp_noise_multiplier > 0:
            raise ValueError(f"dp_noise_multiplier must be > 0, got {self.dp_noise_multiplier}")
        if not self.dp_clip_norm > 0:
            raise ValueError(f"dp_clip_norm must be > 0, got {self.dp_clip_norm}")
        _require_choice(self.dp_accountant, "dp_accountant", tuple(sorted(ACCOUNTANTS)))
        _require_choice(self.dp_unit, "dp_unit", UNITS)
        _require_choice(self.dp_neighbouring_relation, "dp_neighbouring_relation", NEIGHBOURING_RELATIONS)
        _require_choice(self.dp_noise_placement, "dp_noise_placement", NOISE_PLACEMENTS)
        _require_int(self.secure_sum_bits, "secure_sum_bits", minimum=8)
        if self.secure_sum_bits > 48:
            raise ValueError(f"secure_sum_bits must be at most 48, got {self.secure_sum_bits}")
        if not isinstance(self.secure_aggregation, bool):
            raise ValueError(f"secure_aggregation must be True or False, got {self.secure_aggregation!r}")
        _require_finite_number(self.secure_aggregation_range, "secure_aggregation_range")
        if not self.secure_aggregation_range > 0:
            raise ValueError(f"secure_aggregation_range must be > 0, got {self.secure_aggregation_range}")
        if self.secure_aggregation and self.private and self.dp_unit == "client":
            raise ValueError(
                "secure_aggregation under dp_unit='client' would hide the updates the aggregator must clip before "
                "adding its noise: use dp_noise_placement='distributed' (the clients add the noise, and the sum is "
                "secure)."
            )
        if self.private and self.dp_noise_placement == "distributed":
            if self.dp_unit != "client":
                raise ValueError(
                    "dp_noise_placement='distributed' is for dp_unit='client' (clients add the aggregator's noise); "
                    "under dp_unit='example' every client already adds its own noise inside DP-SGD."
                )
            if self.dp_neighbouring_relation not in PUBLIC_ROSTER:
                raise ValueError(DISTRIBUTED_RELATION_ERROR)
            if self.clients_per_round is not None:
                raise ValueError(
                    f"dp_noise_placement='distributed' needs every client in every round (clients_per_round="
                    f"{self.clients_per_round} given): the aggregator that runs the secure sum knows who took part, "
                    "so sampling would not amplify against it. Leave clients_per_round unset."
                )
        if not isinstance(self.dp_secure_mode, bool):
            raise ValueError(f"dp_secure_mode must be True or False, got {self.dp_secure_mode!r}")
        if self.dp_secure_mode and self.dp_secret_seed is not None:
            raise ValueError(
                "dp_secure_mode draws every batch and noise from OS entropy; dp_secret_seed would make them "
                "reproducible. Set one of them, not both."
            )
        _require_choice(self.dp_clipping, "dp_clipping", CLIPPINGS)
        _require_choice(self.dp_noise_calibration, "dp_noise_calibration", NOISE_CALIBRATIONS)
        if not self.dp_fp16_loss_scale > 0:
            raise ValueError(f"dp_fp16_loss_scale must be > 0, got {self.dp_fp16_loss_scale}")


def _require_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_finite_number(value, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _require_choice(value, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
