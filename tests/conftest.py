"""Shared pytest set-up.

The Hugging Face Hub cannot be reached here, so the libraries are put in offline mode at import time, before
any test module imports transformers, datasets or huggingface_hub (they read these variables on import).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
