"""Model card templates shipped with hf_fedlora (installed as the package `hf_fedlora.model_cards`)."""
