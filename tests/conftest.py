"""Shared pytest set-up.

The Hugging Face Hub cannot be reached here, so the libraries are put in offline mode at import time, before
any test module imports transformers, datasets or huggingface_hub (they read these variables on import).
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Secret DP state and Flower ledgers go to private folders outside output_dir; in tests, to a fresh temporary one
# (inherited by the subprocesses tests start), never the user's ~/.cache.
if "HF_FEDLORA_SECRET_DIR" not in os.environ:
    _PRIVATE = tempfile.mkdtemp(prefix="hf_fedlora_test_private_")
    os.environ["HF_FEDLORA_SECRET_DIR"] = os.path.join(_PRIVATE, "secret_state")
    os.environ["HF_FEDLORA_LEDGER_DIR"] = os.path.join(_PRIVATE, "privacy_ledgers")
