"""Secrets stay secret: the DP seed never printed, secure mode leaves no generator state to regenerate the noise, and
what was chosen with private data is said on the card."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import ModelCard
from tiny import fed_args, tiny_peft, toy_dataset

from hf_fedlora import FederatedTrainer, FFALoraConfig
from hf_fedlora.cli import RECIPE_SELECTION, DemoTrainingArguments
from hf_fedlora.hub import save_model_card
from hf_fedlora.privacy import FederatedPrivacy
from hf_fedlora.privacy.engine import NOISE_STREAM, SAMPLING_STREAM, derived_seed
from hf_fedlora.privacy.noise import draw_noise


def test_the_secret_seed_is_masked_wherever_the_arguments_are_printed(tmp_path):
    args = fed_args(tmp_path, dp_noise_multiplier=1.0, dp_secret_seed=987654)
    for text in (str(args), repr(args), args.to_json_string(), str(args.to_dict()), str(args.to_sanitized_dict())):
        assert "987654" not in text
    assert "<DP_SECRET_SEED>" in str(args) and "<DP_SECRET_SEED>" in repr(args)
    assert args.dp_secret_seed == 987654  # masked in print, kept in use


def test_secure_mode_and_a_secret_seed_are_refused_together(tmp_path):
    with pytest.raises(ValueError, match="dp_secure_mode"):
        fed_args(tmp_path, dp_noise_multiplier=1.0, dp_secret_seed=1, dp_secure_mode=True)


def test_secure_noise_has_the_nominal_spread():
    """The mean of four draws scaled back to the std: the same Gaussian, robust to floating-point attacks."""
    noise = draw_noise("w", (200_000,), {}, 0.7, torch.Generator().manual_seed(0), regulate=False, secure=True)
    assert float(noise.std()) == pytest.approx(0.7, rel=0.01) and abs(float(noise.mean())) < 0.01


def test_a_secure_mode_run_never_touches_a_stream_that_could_be_saved_or_replayed(tmp_path):
    """Every batch and noise tensor comes from a generator seeded afresh by OS entropy: after a whole run each
    client's persistent streams are exactly as seeded, never drawn from (so no saved state could regenerate them)."""
    trainer = FederatedTrainer(
        tiny_peft(FFALoraConfig),
        fed_args(tmp_path, num_rounds=2, dp_noise_multiplier=1.0, dp_secure_mode=True),
        train_dataset=toy_dataset(64),
    )
    trainer.train()
    engine = trainer.privacy
    assert trainer.privacy_report()["secure_mode"] is True
    for index, (name, client) in enumerate(engine.clients.items()):
        assert client.steps_taken == 4
        for generator, stream in ((client.noise_generator, NOISE_STREAM), (client.sampling_generator, SAMPLING_STREAM)):
            seeded = torch.Generator().manual_seed(derived_seed(engine._secret_root, index, stream))
            assert torch.equal(generator.get_state(), seeded.get_state()), (name, stream)


def test_secure_mode_engine_uses_no_persistent_generator():
    engine = FederatedPrivacy(
        target_epsilon=None, target_delta=1e-5, noise_multiplier=1.0, clip_norm=1.0, secure_mode=True
    )
    engine.plan({"a": 40}, 8, {"a": 1}, torch.device("cpu"))
    state = engine.clients["a"].sampling_generator.get_state().clone()
    engine.sample_batch("a")
    assert torch.equal(state, engine.clients["a"].sampling_generator.get_state())  # never advanced: never used


def test_the_card_says_how_the_settings_were_chosen(tmp_path):
    from test_hub import PRIVATE_RECORD

    told = dict(PRIVATE_RECORD, hyperparameter_selection="tuned on a public dataset")
    assert (
        "How the settings were chosen: tuned on a public dataset"
        in ModelCard.load(save_model_card(tmp_path / "told", told)).content
    )
    untold = ModelCard.load(save_model_card(tmp_path / "untold", PRIVATE_RECORD)).content
    assert "is not recorded" in untold and "outside ε (Papernot and Steinke, 2022)" in untold


def test_the_demo_says_its_recipe_was_chosen_on_the_training_split():
    assert DemoTrainingArguments(output_dir="x").hyperparameter_selection == RECIPE_SELECTION
    assert "same training split" in RECIPE_SELECTION and "outside ε" in RECIPE_SELECTION
