"""`FederatedTrainer`: a `transformers.Trainer` that simulates LoRA clients and runs federated rounds.

The trainer is the Trainer integration: callbacks, evaluation, logging, checkpoints, the record, the card and the
push. The server half (plan, participants, sub-rounds, min-clients, aggregation, the privacy account) is
`hf_fedlora.server.Federation`, which drives this trainer's client round (`local_round`) in process, as a Flower
Grid drives it across machines. One base model lives in memory: a client is its data shard and its privacy state;
its adapter is swapped into the model's LoRA parameters for its local work and the release is read back out. The
trainer never names a method, and what each privacy mode does inside a client round is the privacy layer's
(`hf_fedlora.privacy.client_round`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Value
from peft import PeftModel
from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint
from transformers.utils import logging

from .atomic_json import write_json_atomically
from .federation.adapter_state import adapter_parameters, factor_of, load_into, parameters_of, snapshot
from .federation.clients import check_data, clients_from, label_histograms, partition_seed
from .federation.secure_mean import SecureMeanEncoding
from .hub import CARD_NAME, FEDERATED_RECORD_NAME, model_record, save_model_card, upload_files
from .lr_schedule import learning_rate_factor
from .methods import FedLoraConfig
from .privacy import (
    PerExampleGradients,
    check_dp_trainable,
    check_no_batch_statistics,
    check_supported,
    check_trainable_is_federated,
)
from .privacy.client_level import ClientLevelPrivacy
from .privacy.distributed_noise import client_encoder
from .privacy.modes import client_round_privacy, privacy_from_args, server_accounts
from .privacy.secret_store import SecretStore, new_run_id
from .privacy.state import steps_of
from .server import ClientFacts, ClientFailure, ClientRelease, Federation, PlanRequest
from .training_args import FederatedTrainingArguments

logger = logging.get_logger(__name__)

# Private files: what resuming needs. Never pushed (pushes list their files) and never in the card. The secret DP
# state (noise and sampler streams) is not among them: it lives in the secret store, apart from output_dir.
RESUME_STATE = "federated_resume_state.json"
RESUME_WEIGHTS = "federated_resume_adapter.safetensors"


class FederatedTrainer(Trainer):
    """Federated (and optionally differentially private) LoRA fine-tuning, constructed like any Trainer.

    `train_dataset` is either one `datasets.Dataset`, split among clients as `args.partition` says, or ready-made
    clients: a list or a dict of datasets.
    """

    def __init__(
        self,
        model: PeftModel,
        args: FederatedTrainingArguments,
        train_dataset: Dataset | Sequence[Dataset] | Mapping[str, Dataset] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(args, FederatedTrainingArguments):
            raise ValueError(f"args must be FederatedTrainingArguments, got {type(args).__name__}")
        config = _federated_config(model)
        self.client_datasets, self._clients_given, self._partition_draws = clients_from(train_dataset, args)
        super().__init__(model=model, args=args, train_dataset=None, **kwargs)

        self.method = config.build_method()
        self._adapter = adapter_parameters(self.model)
        self.privacy = privacy_from_args(args)
        check_data(self.model, config, self.client_datasets, self.eval_dataset, args.label_column)
        check_trainable_is_federated(self.model)
        if self._per_example_dp:
            check_dp_trainable(self.model)
            check_supported(self.model, set(self._adapter))
            check_no_batch_statistics(self.model)
        self.continued_from = self._continue_from(config)
        if self.continued_from is None:  # a fresh adapter: every client draws the same A from the shared seed
            self.method.initialize(self.model)
        self._per_example_gradients = PerExampleGradients(self.model)
        self._round = None  # the privacy object of the client round in progress
        self._set_trainable(self.method.trained_factors(0, 0, 0))
        self._global_state = snapshot(self._adapter)
        self.client_label_histograms = label_histograms(self.client_datasets, args.label_column)
        # A client's position in the federation: derives its dropout and shuffling streams (and, under DP, the
        # privacy engine derives its secret streams from it). A driver that builds a trainer over one client's
        # data (e.g. a Flower ClientApp) sets that client's federation-wide index here.
        self.client_indices = {name: index for index, name in enumerate(self.client_datasets)}
        self._prepared_clients: dict[str, Dataset] | None = None
        facts = {
            name: ClientFacts(len(data), self.local_steps_for(len(data))) for name, data in self.client_datasets.items()
        }
        self.federation = Federation(
            self.method,
            args,
            facts,
            self._global_state,
            InProcessClients(self),
            client_level=self.privacy if isinstance(self.privacy, ClientLevelPrivacy) else None,
            accounts=server_accounts(args),
        )
        self._run_id = new_run_id()  # names this run's secret state in the secret store
        self._model_card_kwargs: dict[str, Any] = {}
        self._saved_files: list[str] = []
        if hasattr(self.model, "add_model_tags"):
            tags = ["hf_fedlora", "federated-learning", self.method.name]
            self.model.add_model_tags(tags + (["differential-privacy"] if self.privacy.enabled else []))

    def _continue_from(self, config: FedLoraConfig) -> dict[str, Any] | None:
        """None for a fresh adapter; for a trained one, compose with what its recorded run spent (or refuse).

        A trained adapter (some lora_B not zero) is never re-initialised. Under DP its earlier privacy loss composes
        with this run's, per example: by client when the clients are the recorded ones (the same partition of one
        dataset, which places each example by its content; or the same natural clients), else every client starts
        from the worst of the recorded clients' histories. Unless the user knowingly starts a new budget.
        """
        if all(not p.any() for name, p in self._adapter.items() if ".lora_B." in name):
            return None
        prior = getattr(config, "federated_record", None)
        new_budget = bool(self.args.dp_new_privacy_budget)
        continued = {"recorded": prior is not None, "new_privacy_budget": new_budget}
        if prior is not None:
            prior_privacy = prior.get("privacy") or {}
            continued.update(
                rounds=prior.get("rounds"), private=bool(prior_privacy.get("private")), unit=prior_privacy.get("unit")
            )
            if prior_privacy.get("private"):
                continued["epsilon"] = prior_privacy.get("epsilon")
        if not self.privacy.enabled or new_budget:
            if self.privacy.enabled:
                logger.warning(
                    "dp_new_privacy_budget=True: the privacy this adapter already spent is NOT counted; the "
                    "guarantee is only right if this run's data are disjoint from its earlier training data."
                )
            return continued
        fix = "Set dp_new_privacy_budget=True only if this run's data are disjoint from the data it was trained on."
        if prior is None:
            raise ValueError(
                "The adapter is already trained (lora_B is not zero) but carries no record of how: its earlier "
                "privacy loss cannot be composed with this run's. Load its config with "
                "FFALoraConfig.from_pretrained(path) (or the method's config class) so the record of its run "
                f"comes with it. {fix}"
            )
        if not continued["private"]:
            raise ValueError(
                "The adapter was trained without differential privacy on (presumably) the same data: no epsilon "
                f"can be claimed for those data by continuing it under DP. {fix}"
            )
        same_split = (
            not self._clients_given
            and prior.get("partition") == self._partition_record()
            and prior.get("num_clients") == len(self.client_datasets)
        )
        if isinstance(self.privacy, ClientLevelPrivacy):
            if not (same_split or self._clients_given):
                raise ValueError(
                    "Under dp_unit='client' a continued run composes with the recorded run only for the same clients, "
                    f"but this run splits the data differently (recorded partition {prior.get('partition')}; now "
                    f"{self._partition_record()}). Split it as before. {fix}"
                )
            assumed = " (assumed: ready-made clients)" if self._clients_given else ""
            continued["composed"] = "the same clients" + assumed
            self.privacy.compose_with(prior["privacy"])
            return continued
        # Example unit: by client only when an example's client is known to be the same: the same partition of one
        # dataset (placed by content) into the same clients. Otherwise each client answers for the worst history.
        by_name = same_split and set(prior["privacy"].get("clients") or {}) == set(self.client_datasets)
        continued["composed"] = "by client" if by_name else "worst earlier client"
        self.privacy.compose_with(prior["privacy"], by_name=by_name)
        return continued

    # ------------------------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs: Any) -> TrainOutput:
        """Run rounds until `args.num_rounds` rounds are done; a later call continues the same run.

        `resume_from_checkpoint` (True: the last complete checkpoint in output_dir, or a path) continues a run
        that stopped: the global adapter, the round, each client's spent privacy and secret RNG states, the
        schedule and the history come back, and steps a crash lost after that checkpoint stay counted.
        """
        if resume_from_checkpoint:
            self._resume(resume_from_checkpoint)
        args, federation = self.args, self.federation
        self._clients_ready_for_training()
        federation.plan(args.num_rounds)
        if self.privacy.enabled:
            logger.info(f"Differential privacy (unit: one {self.privacy.unit}): {self._privacy_summary()}")
            if self.privacy.seeded:
                logger.warning(
                    "The DP randomness (batch sampling and noise) comes from dp_secret_seed: the guarantee holds only "
                    "while that seed stays secret. Leave it unset for a real run."
                )
        else:
            logger.warning("Non-private run: no differential-privacy guarantee (set dp_target_epsilon for one).")
        self.state.max_steps = args.num_rounds
        self.state.global_step = federation.rounds_done
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        try:
            for round_index in range(federation.rounds_done, args.num_rounds):
                self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
                entry = federation.run_round(round_index)
                self._write_secret_state()  # before anything of the round is published
                load_into(self._adapter, self._global_state)
                self.state.global_step = federation.rounds_done
                self.state.epoch = float(federation.rounds_done)
                self._log_round(entry)
                self.control = self.callback_handler.on_step_end(args, self.state, self.control)
                last = federation.rounds_done == args.num_rounds
                if self.eval_dataset is not None and (federation.rounds_done % args.eval_every_rounds == 0 or last):
                    entry.update(self.evaluate())
                if self._checkpoint_due():
                    self._save_checkpoint()
                    if args.push_to_hub and str(getattr(args.hub_strategy, "value", args.hub_strategy)) != "end":
                        self.push_to_hub(commit_message=f"Training in progress, round {federation.rounds_done}")
                if self.control.should_training_stop:
                    break
        finally:
            self._per_example_gradients.remove()
            load_into(self._adapter, self._global_state)
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        # A later trainer on this same model continues from this run's record (and composes its privacy).
        _federated_config(self.model).federated_record = self._json_record()
        losses = [entry["train_loss"] for entry in federation.round_history if "train_loss" in entry]
        metrics = {"train_loss": float(np.mean(losses)) if losses else float("nan"), "rounds": federation.rounds_done}
        if self.privacy.enabled:
            metrics["epsilon"] = federation.max_epsilon()
        return TrainOutput(global_step=federation.rounds_done, training_loss=metrics["train_loss"], metrics=metrics)

    @property
    def _rounds_done(self) -> int:
        return self.federation.rounds_done

    def apply_uploads(self, uploads: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> None:
        """The method's aggregation of uploads merged into the global adapter (an upload may hold part of it, e.g.
        FFA-LoRA's B), then the method's server step: for a driver that aggregates by hand."""
        self._global_state.update(self.method.aggregate(uploads, weights))
        self._global_state.update(self.method.after_aggregation(self._global_state))

    def load_global_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace (part of) the global adapter, e.g. with the state a Flower client receives from its server."""
        unknown = sorted(set(state) - set(self._global_state))
        if unknown:
            raise ValueError(f"load_global_state: {unknown[:3]} are not parameters of this adapter")
        self._global_state.update({key: tensor.detach().clone() for key, tensor in state.items()})

    def global_state(self) -> dict[str, torch.Tensor]:
        """A copy of the global adapter state (what a server sends to its clients, or saves)."""
        return {key: tensor.clone() for key, tensor in self._global_state.items()}

    def local_steps_for(self, num_examples: int) -> int:
        """Local steps a client with this many examples runs per (sub-)round: local_steps, else local_epochs."""
        if self.args.local_steps is not None:
            return self.args.local_steps
        epochs = self.args.local_epochs if self.args.local_epochs is not None else 1.0
        return max(1, math.ceil(epochs * num_examples / self.logical_batch_size))

    @property
    def logical_batch_size(self) -> int:
        """Examples per optimizer step (Trainer's convention: per_device_train_batch_size is the physical micro-batch,
        times gradient_accumulation_steps). Under DP it is the expected Poisson batch: it sets q = logical / n."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    # ------------------------------------------------------------------------------------
    # The client round
    # ------------------------------------------------------------------------------------
    def local_round(
        self, name: str, round_index: int, sub_round: int, steps: int
    ) -> tuple[dict[str, torch.Tensor] | None, list[float]]:
        """One client's local work from the global adapter: train and return what it releases (None if it ran no
        step) and its losses (empty under DP unless published on request). What the privacy mode changes (batches,
        the optimizer, the loss, accounting, the release) is the privacy object's.

        Public so that other drivers (e.g. Flower) run the very same client round. Dropout draws from a stream
        derived from the seed, the client and the (sub-)round, so every driver reproduces it.
        """
        index = self.client_indices[name]
        torch.manual_seed(
            int(np.random.SeedSequence([self.args.seed, index, round_index, sub_round]).generate_state(1)[0])
        )
        # Shuffling for non-private local training only (derived per client and round, like dropout); under DP
        # batches come from the privacy engine's secret sampler, never from this published seed.
        shuffle_seed = np.random.SeedSequence([self.args.seed, index, round_index, sub_round, 1]).generate_state(1)[0]
        shuffle = torch.Generator().manual_seed(int(shuffle_seed))
        load_into(self._adapter, self._global_state)
        self.model.train()
        self._round = self._make_round(name, round_index, sub_round)
        optimizer = self._round.optimizer(
            self._fresh_optimizer(),
            batch_size=self.logical_batch_size,
            adapter=self._adapter,
            regulate=self.method.regulates_noise(),
            noisy_gradient_filter=self.method.noisy_gradient_filter(),
        )
        data = self._clients_ready_for_training()[name]
        sub_rounds = self.method.num_sub_rounds(round_index)
        schedule = learning_rate_factor(self.args, self.args.num_rounds * sub_rounds * steps)
        first_step = (round_index * sub_rounds + sub_round) * steps  # this (sub-)round's place in the whole run
        losses, steps_run = [], 0
        try:
            for step in range(steps):
                if not self._round.can_step():
                    logger.warning(f"Client {name!r} has spent its privacy budget and stops training.")
                    break
                self._set_trainable(self.method.trained_factors(round_index, sub_round, step))
                indices = self._round.next_batch(step, len(data), self.logical_batch_size, shuffle)
                for group in optimizer.param_groups:
                    group["lr"] = group["scheduled_from"] * schedule(first_step + step)
                loss = self._local_step(data, indices, optimizer)
                if loss is not None:
                    losses.append(loss)
                steps_run += 1
        finally:
            optimizer.zero_grad(set_to_none=True)  # no per-example gradients left for the next client
            self._round.close()  # the secret state is on disk before anything computed from it leaves
        round_privacy, self._round = self._round, None
        if steps_run == 0:
            return None, round_privacy.published_losses(losses)
        trained = snapshot(parameters_of(self._adapter, self.method.uploaded_factors(round_index, sub_round)))
        start = {key: self._global_state[key] for key in trained}
        return round_privacy.release(start, trained), round_privacy.published_losses(losses)

    def _make_round(self, name: str | None, round_index: int = 0, sub_round: int = 0):
        return client_round_privacy(
            self.args,
            self.accelerator,
            self.privacy if self._per_example_dp else None,
            name,
            encoder=self._distributed_encoder(name, round_index, sub_round),
            loss_scale=self._per_example_loss_scale,
            on_close=self._write_secret_state,
        )

    def _distributed_encoder(self, name: str | None, round_index: int, sub_round: int):
        """Under distributed noise, the client's encoding for the secure sum (the aggregator's public plan)."""
        plan = getattr(self.privacy, "distributed", None)
        if plan is None or name is None:
            return None
        index = self.client_indices[name]
        return client_encoder(plan, self.args.seed, self.args.dp_secret_seed, index, round_index, sub_round)

    @property
    def _per_example_dp(self) -> bool:
        """DP-SGD inside the client (example unit); under the client unit only the round's update is clipped."""
        return self.privacy.enabled and self.privacy.unit == "example"

    @property
    def _per_example_loss_scale(self) -> float:
        """The fixed factor on the loss under per-example DP, which the DP optimizer divides out of each example's
        gradient: dp_fp16_loss_scale with fp16, else 1. One value for both, so they cannot disagree."""
        return self.args.dp_fp16_loss_scale if self.args.fp16 else 1.0

    def _local_step(self, data: Dataset, indices: list[int], optimizer: torch.optim.Optimizer) -> float | None:
        """One optimizer step on one logical batch, run in micro-batches of at most per_device_train_batch_size.

        Under DP each micro-batch's per-example gradients are clipped and summed into the logical batch's sum; the
        noise is added and the optimizer steps once, after the last micro-batch. An empty Poisson batch still takes
        a (pure-noise) step.
        """
        round_privacy = self._round or self._make_round(None)
        if not indices:
            round_privacy.empty_step(optimizer, self._trainable_parameters())
            return None
        size = self.args.per_device_train_batch_size
        if round_privacy.per_example and len(indices) > size:
            indices = self._sorted_by_length(data, indices)
        micro_batches = [indices[start : start + size] for start in range(0, len(indices), size)]
        loss = 0.0
        for position, micro_batch in enumerate(micro_batches):
            loss += self._backward_batch(data, micro_batch, len(micro_batch) / len(indices)) * len(micro_batch)
            round_privacy.after_micro_batch(optimizer, last=position == len(micro_batches) - 1)
        round_privacy.finish_step(optimizer, self._trainable_parameters())
        return loss / len(indices)

    def _sorted_by_length(self, data: Dataset, indices: list[int]) -> list[int]:
        """The logical batch ordered by sequence length, so each micro-batch pads only to its own longest example
        (Trainer's group_by_length, inside one step). Under DP this changes nothing but the padding: each example's
        gradient is its own, and only their clipped sum leaves the step. Inputs of one shape (images) stay put."""
        column = getattr(self.model, "main_input_name", "input_ids")
        feature = data.features.get(column) if data.features else None
        if feature is None or not isinstance(getattr(feature, "feature", None), Value):
            return indices  # not a 1-D token sequence
        lengths = [len(row) for row in data.select_columns([column])[indices][column]]
        return [index for _, index in sorted(zip(lengths, indices, strict=True), key=lambda pair: pair[0])]

    def _backward_batch(self, data: Dataset, indices: list[int], loss_scale: float = 1.0) -> float:
        """Forward and backward of one (micro-)batch; returns its mean loss. Without per-example DP the micro-batch's
        mean loss is weighted by `loss_scale` so micro-batches add up to the logical mean; under DP each example's own
        loss is summed (the hooks then record gradients that depend on no other example). Mixed precision autocasts
        the forward; the adapter's parameters, and so its gradients, stay in float32."""
        round_privacy = self._round or self._make_round(None)
        rows = data[indices]
        features = [{key: values[i] for key, values in rows.items()} for i in range(len(indices))]
        inputs = self._prepare_inputs(self.data_collator(features))
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss, mean_loss = round_privacy.loss(self.model, inputs, len(indices), self._causal_lm, self.compute_loss)
        round_privacy.backward(loss, loss_scale, len(indices), self._per_example_gradients)
        return mean_loss

    def _set_trainable(self, factors: frozenset[str]) -> None:
        """Freeze everything but the given factors; under DP, keep Opacus's hooks on exactly that set."""
        trainable = parameters_of(self._adapter, factors)
        for name, parameter in self._adapter.items():
            parameter.requires_grad_(name in trainable)
        if self._per_example_dp:
            self._per_example_gradients.attach_for(frozenset(trainable))

    def _trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self._adapter.values() if p.requires_grad]

    def _fresh_optimizer(self) -> torch.optim.Optimizer:
        """A new optimizer each client-round (state is reset every round, as the papers do); `lr_scheduler_type`
        sets each step's rate over the whole run (hf_fedlora.lr_schedule).

        It holds every adapter parameter; those frozen at a step have no gradient and are skipped.
        """
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        for name, parameter in self._adapter.items():
            scale = self.method.learning_rate_scale(factor_of(name))  # e.g. LA-LoRA's lr_ratio_b
            groups.setdefault((name in decay, scale), []).append(parameter)
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        return optimizer_cls(
            [
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if decayed else 0.0,
                    "lr": self.args.learning_rate * scale,
                    "scheduled_from": self.args.learning_rate * scale,  # lr_scheduler_type scales it per step
                }
                for (decayed, scale), params in groups.items()
            ],
            **optimizer_kwargs,
        )

    @property
    def _causal_lm(self) -> bool:
        """Next-token prediction: token labels are shifted by one in the per-example loss."""
        task_type = _federated_config(self.model).task_type
        return str(getattr(task_type, "value", task_type)) == "CAUSAL_LM"

    def _clients_ready_for_training(self) -> dict[str, Dataset]:
        """Client shards with the columns the model does not take removed (once)."""
        if self._prepared_clients is None:
            self._prepared_clients = {
                name: self._remove_unused_columns(data, description=f"client {name}")
                for name, data in self.client_datasets.items()
            }
        return self._prepared_clients

    # ------------------------------------------------------------------------------------
    # Checkpoints and resuming (private state: never pushed, never in the card)
    # ------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """checkpoint-N, written whole in a hidden folder and renamed into place: a crash never leaves a folder
        that a later run would take for a checkpoint. It holds no secret DP state: the round already wrote that to the
        secret store, which the checkpoint names."""
        rounds = self._rounds_done
        final = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{rounds}")
        partial = os.path.join(self.args.output_dir, f".partial-{PREFIX_CHECKPOINT_DIR}-{rounds}")
        shutil.rmtree(partial, ignore_errors=True)
        self._save(partial)
        save_file({k: v.contiguous() for k, v in self._global_state.items()}, os.path.join(partial, RESUME_WEIGHTS))
        write_json_atomically(os.path.join(partial, RESUME_STATE), self._resume_state(), default=_json_default)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        if self.args.save_total_limit:  # keep the newest save_total_limit checkpoints
            pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
            numbered = sorted(
                (int(match.group(1)), entry.path)
                for entry in os.scandir(self.args.output_dir)
                if entry.is_dir() and (match := pattern.match(entry.name))
            )
            for _, old in numbered[: max(0, len(numbered) - self.args.save_total_limit)]:
                shutil.rmtree(old)

    def _resume_state(self) -> dict[str, Any]:
        return {
            "clients": list(self.client_datasets),
            "private": self.privacy.enabled,
            "secret_state": self._run_id if self.privacy.enabled else None,
            "federation": self.federation.state_dict(),
            "log_history": self.state.log_history,
        }

    def _secret_store(self) -> SecretStore:
        return SecretStore(self._run_id)

    def _write_secret_state(self) -> None:
        """Every client's spent history and secret RNG states (and the aggregator's), in the secret store, before
        anything computed from them is released: a crash can over-count privacy but never under-count it or replay
        a noise stream. Only when the run can be resumed (checkpoints on)."""
        if not (self.privacy.enabled and self._checkpoints_on):
            return
        engine = self.privacy.state_dict() if self._per_example_dp else None
        self._secret_store().save({"engine": engine, "aggregator": self.federation.secret_state_dict()})

    @property
    def _checkpoints_on(self) -> bool:
        return str(getattr(self.args.save_strategy, "value", self.args.save_strategy)) != "no"

    def _resume(self, checkpoint: str | bool) -> None:
        path = get_last_checkpoint(self.args.output_dir) if checkpoint is True else str(checkpoint)
        if path is None or not os.path.isfile(os.path.join(path, RESUME_STATE)):
            raise ValueError(
                f"resume_from_checkpoint={checkpoint!r}: no complete checkpoint "
                f"({PREFIX_CHECKPOINT_DIR}-N with {RESUME_STATE}) found"
                + ("" if checkpoint is not True else f" in output_dir={self.args.output_dir!r}")
            )
        with open(os.path.join(path, RESUME_STATE)) as handle:
            state = json.load(handle)
        if state["clients"] != list(self.client_datasets):
            raise ValueError(
                f"The checkpoint {path} was made with clients {state['clients']}, this trainer has "
                f"{list(self.client_datasets)}: resume with the same data and partition"
            )
        if bool(state["private"]) != self.privacy.enabled:
            raise ValueError(f"The checkpoint {path} and these arguments disagree on whether the run is private")
        secret = None
        if self.privacy.enabled:
            self._run_id = state["secret_state"]
            secret = self._secret_store().load()  # refuses clearly when missing
        self._global_state.update(load_file(os.path.join(path, RESUME_WEIGHTS)))
        load_into(self._adapter, self._global_state)
        self.federation.load_state_dict(state["federation"])
        self.state.log_history = state["log_history"]
        if secret is not None:
            self.federation.load_secret_state_dict(secret.get("aggregator"))
            if self._per_example_dp:
                self.privacy.load_state_dict(secret["engine"], self.args.device)
                behind = self._clients_ahead_of_checkpoint()
                if behind:
                    logger.warning(
                        f"Clients {behind} ran steps after {path} before the run stopped: those steps stay counted "
                        "(their noise for the remaining steps is recalibrated to stay within the target)."
                    )
        logger.info(f"Resumed from {path} after round {self._rounds_done}")

    def _clients_ahead_of_checkpoint(self) -> list[str]:
        """Clients whose secret state (always the newest) ran more steps than the checkpoint's account."""
        accounts = self.federation.accounts
        behind = [
            name
            for name, client in self.privacy.clients.items()
            if name in accounts.clients and client.steps_taken > steps_of(accounts.clients[name].own_history())
        ]
        self.privacy.recalibrate_on_next_plan(behind)
        return behind

    def _checkpoint_due(self) -> bool:
        """Trainer's save_strategy, counted in rounds: "epoch" saves every round, "steps" every save_steps rounds."""
        strategy = str(getattr(self.args.save_strategy, "value", self.args.save_strategy))
        if strategy == "epoch":
            return True
        if strategy == "steps":
            every = max(1, int(self.args.save_steps))
            return self._rounds_done % every == 0
        return False

    def _log_round(self, entry: dict[str, Any]) -> None:
        """The round's entry (the federation's: participant counts only where participation is public), with the
        epsilon spent so far at the logging cadence, to `report_to` and the history."""
        if self.privacy.enabled and self._epsilon_logged(entry["round"]):
            entry["epsilon"] = self.federation.max_epsilon()
            entry["delta"] = self.privacy.delta
        self.log(dict(entry))

    def _epsilon_logged(self, rounds_done: int) -> bool:
        """Whether this round's log carries the epsilon spent so far: at Trainer's logging cadence (a round is a
        step: `logging_steps` rounds, every round for "epoch", never for "no") and always after the last round.
        A PRV call per client whose history changed costs 10-30 ms, more than a tiny model's client round; the
        accountant records every step either way, and `privacy_report()` gives the epsilon spent at any time."""
        if rounds_done >= self.args.num_rounds:
            return True
        strategy = str(getattr(self.args.logging_strategy, "value", self.args.logging_strategy))
        if strategy == "epoch":
            return True
        every = self.args.logging_steps
        if strategy != "steps" or not every:
            return False
        every = max(1, math.ceil(every * self.args.num_rounds) if every < 1 else int(every))  # a ratio, as Trainer
        return rounds_done % every == 0

    def _privacy_summary(self) -> str:
        report = self.privacy_report()
        common = (
            f"target epsilon={report.get('target_epsilon')}, delta={report.get('delta')}, clip norm="
            f"{report.get('clip_norm')} ({report.get('clipping')}), accountant={report.get('accountant')}"
        )
        if report.get("unit") == "client":  # one mechanism for everyone; nothing per client is published
            return (
                f"{common}, neighbouring relation={report['neighbouring_relation']}: sample rate q="
                f"{report['sample_rate']:.4g}, expected clients per round={report['expected_clients_per_round']:g}, "
                f"sigma={report['noise_multiplier']:.4g}"
            )
        return f"{common}; " + "; ".join(
            f"{name}: n={c['num_examples']}, q={c['sample_rate']:.4g}, sigma={c['noise_multiplier']:.4g}"
            for name, c in report.get("clients", {}).items()
        )

    # ------------------------------------------------------------------------------------
    # Reports and saving
    # ------------------------------------------------------------------------------------
    def privacy_report(self) -> dict[str, Any]:
        """The run's privacy account: the server half's, re-derived from what it planned and scheduled (example
        unit: epsilon per client and the (sigma, sample rate, steps) history behind it; client unit: the
        federation's one history). Names the unit and the accountant."""
        if self.federation.private and (self.federation.rounds_done or self.federation.accounts is None):
            return self.federation.privacy_report()
        return self.privacy.report()  # before the first round: what the engine knows (composed earlier runs)

    def federated_record(self) -> dict[str, Any]:
        """What was run: method, federation, partition and the privacy record (saved beside the adapter)."""
        config = _federated_config(self.model)
        record = {**model_record(self.model, config), **self.federation.record(self.client_label_histograms)}
        record.update(
            privacy=self.privacy_report(), partition=self._partition_record(), continued_from=self.continued_from
        )
        return record

    def _partition_record(self) -> dict[str, Any]:
        args = self.args
        if self._clients_given:
            return {"scheme": "given"}
        record: dict[str, Any] = {"scheme": args.partition, "seed": partition_seed(args)}
        if args.partition == "dirichlet":
            record["dirichlet_alpha"] = args.dirichlet_alpha
        if args.partition == "label_proportions":
            record["label_proportions"] = args.parsed_label_proportions()
        if args.partition == "column":
            record["client_column"] = args.client_column
        record["min_size"] = args.effective_partition_min_size
        record["draws"] = self._partition_draws
        return record

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The global adapter (safetensors, plain PEFT format) and the federated record; nothing pickled."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        load_into(self._adapter, self._global_state)
        self.model.save_pretrained(output_dir, safe_serialization=True)
        written = [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
        if self.processing_class is not None:
            saved = self.processing_class.save_pretrained(output_dir) or []
            written += [
                os.path.basename(path)
                for path in saved
                if os.path.dirname(os.path.abspath(path)) == os.path.abspath(output_dir)
            ]
        record = self._json_record()
        with open(os.path.join(output_dir, FEDERATED_RECORD_NAME), "w") as handle:
            json.dump(record, handle, indent=2)
        save_model_card(output_dir, record, **self._model_card_kwargs)  # replaces PEFT's generic README.md
        self._saved_files = sorted(set(written + [FEDERATED_RECORD_NAME, CARD_NAME]))

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the model card (privacy guarantee, method, federation, results) into output_dir.

        The arguments are remembered: every later save writes the card again with them, as TRL does.
        """
        self._remember_card_arguments(model_name, dataset_name, tags)
        if self.is_world_process_zero():
            save_model_card(self.args.output_dir, self._json_record(), **self._model_card_kwargs)

    def _remember_card_arguments(
        self, model_name: str | None, dataset_name: str | None, tags: str | list[str] | None
    ) -> None:
        if model_name is not None:
            self._model_card_kwargs["model_name"] = model_name
        if dataset_name is not None:
            self._model_card_kwargs["dataset_name"] = dataset_name
        if tags is not None:
            self._model_card_kwargs["tags"] = [tags] if isinstance(tags, str) else list(tags)

    def _json_record(self) -> dict[str, Any]:
        """The federated record as plain JSON types (what the sidecar holds and the card is rendered from)."""
        return json.loads(json.dumps(self.federated_record(), default=_json_default))

    def _repo_id(self) -> str:
        """Trainer's rule: hub_model_id, else the output folder's name."""
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Only remember the repo id here: the repo is created when something is pushed."""
        self.hub_model_id = self._repo_id()
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ):
        """Upload the global adapter, its model card and the federated record to `args.hub_model_id`.

        Only those files go up: never per-client states, data or optimizer state. Keyword arguments
        (`model_name`, `dataset_name`, `tags`) go to the model card, as with `create_model_card`.
        """
        self._model_card_kwargs.setdefault("repo_id", self._repo_id())
        self._remember_card_arguments(kwargs.get("model_name"), kwargs.get("dataset_name"), kwargs.get("tags"))
        # _internal_call: otherwise Trainer.save_model would call push_to_hub again (args.push_to_hub).
        self.save_model(self.args.output_dir, _internal_call=True)  # writes adapter, record and card
        if not self.is_world_process_zero():
            return None
        return upload_files(
            self.args.output_dir,
            self._saved_files,
            repo_id=self._repo_id(),
            token=token if token is not None else self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            commit_message=commit_message or "End of training",
            revision=revision if revision is not None else self.args.hub_revision,
        )


class InProcessClients:
    """The in-process client runner of the `Federation`: every client's round on this trainer's one model."""

    def __init__(self, trainer: FederatedTrainer):
        self.trainer = trainer

    def plan(self, requests: Mapping[str, PlanRequest]) -> dict[str, dict[str, Any]]:
        """Every client calibrates its noise against what its examples already spent (all at once: grid and shared
        calibration look at every client)."""
        trainer, engine = self.trainer, self.trainer.privacy
        sizes = {name: len(trainer.client_datasets[name]) for name in requests}
        first = next(iter(requests.values()))
        engine.plan(
            sizes,
            first.batch_size,
            {name: request.planned_steps for name, request in requests.items()},
            trainer.args.device,
            total_examples=first.total_examples,
        )
        return {name: engine.plan_reply(name) for name in requests}

    def run(
        self,
        names: Sequence[str],
        round_index: int,
        sub_round: int,
        steps: Mapping[str, int],
        global_state: Mapping[str, torch.Tensor],
        progress: bool,
        secure_mean: SecureMeanEncoding | None = None,
    ) -> Iterator[tuple[str, ClientRelease | ClientFailure]]:
        """Each client's round in turn. Under secure aggregation each upload leaves encoded for the secure sum
        (simulated here: the server adds the encodings, as a secure sum reveals their sum)."""
        trainer = self.trainer
        bar = tqdm(names, desc=f"round {round_index + 1}", leave=False, disable=not progress)
        for name in bar:
            try:
                upload, losses = trainer.local_round(name, round_index, sub_round, steps[name])
            except Exception as error:  # one client's failure need not cost the round (its spend stays counted)
                if trainer.args.min_clients_per_round is None:
                    raise
                yield name, ClientFailure(repr(error))
                continue
            report = trainer.privacy.client_report(name) if trainer._per_example_dp else None
            if secure_mean is not None and upload is not None:
                upload = secure_mean.encode(name, trainer.client_indices[name], upload, global_state)
            yield name, ClientRelease(upload, losses, report)


# ----------------------------------------------------------------------------------------
# Input checks and helpers (plain functions: they run before the Trainer is built)
# ----------------------------------------------------------------------------------------
def _federated_config(model: Any) -> FedLoraConfig:
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"model must be a PeftModel built with get_peft_model(model, FFALoraConfig(...)) or another "
            f"hf_fedlora config, got {type(model).__name__}"
        )
    config = model.peft_config[model.active_adapter]
    if not isinstance(config, FedLoraConfig):
        raise ValueError(
            f"The model's PEFT config is a {type(config).__name__}; FederatedTrainer needs an hf_fedlora config "
            "(FedLoraConfig, FFALoraConfig, ...) so it knows the federated method"
        )
    if not adapter_parameters(model):
        raise ValueError("The model has no LoRA parameters: check target_modules")
    return config


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
