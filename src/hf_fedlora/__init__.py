"""Federated, differentially private LoRA fine-tuning for the Hugging Face stack."""
