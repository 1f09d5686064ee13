#!/usr/bin/env python
"""Offline stand-ins for a medical image dataset and a ViT checkpoint, to try the example without a network.

Writes scikit-learn's handwritten digits (8x8 grey images, shipped with scikit-learn) as an image folder,
one sub-folder per class, and a tiny randomly initialised ViT with its (PIL) image processor:

    python make_offline_assets.py --output_dir offline_assets
    # -> offline_assets/images/<digit>/<n>.png and offline_assets/tiny-vit/

The tiny ViT has no pretrained weights: this checks that the pipeline runs (and how fast), not what a
pretrained ViT reaches on real medical images.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil


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


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="offline_assets", help="Where images/ and tiny-vit/ are written.")
    parser.add_argument("--num_images", type=int, default=300, help="Digit images to write (a few hundred).")
    parser.add_argument("--num_classes", type=int, default=10, help="Digit classes to keep (2 to 10).")
    parser.add_argument("--image_size", type=int, default=32, help="Side of the written images and of the ViT.")
    options = parser.parse_args(args)
    output = Path(options.output_dir)
    images = write_digit_images(output / "images", options.num_images, options.num_classes, options.image_size)
    model = write_tiny_vit(output / "tiny-vit", options.image_size)
    print(f"Wrote {options.num_images} images to {images} and a tiny ViT to {model}")


if __name__ == "__main__":
    main()
