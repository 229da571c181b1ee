"""A model with planted register neurons and images that trigger them: the README's and the tests' stand-in for a
large ViT trained without registers, whose real weights cannot be downloaded offline."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BitImageProcessor

from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

SIDE, PATCH = 64, 8  # 8 x 8 patches
MARKER, OUTLIER = 3, 17  # residual channels: a patch's brightness, and the direction the outliers take
PLANTED = ((1, 5), (1, 37), (1, 70), (1, 101))  # (block, MLP unit)


def planted_model() -> ViTRegModel:
    """A 3-block ViT without registers whose PLANTED units turn white patches into high-norm tokens after block 1.

    The patch embedding sees a patch's brightness only in channel MARKER (every other filter sums to zero), too
    weakly for white patches to be outliers yet; each planted unit fires only where that channel dominates the
    normed token and writes a large value into channel OUTLIER, which the final norm weights 8x, so the outliers
    show after the final norm as DINOv2's do.
    """
    torch.manual_seed(0)
    config = ViTRegConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=SIDE, patch_size=PATCH,
        num_register_tokens=0, layerscale_value=None, use_mask_token=False,
    )  # fmt: skip
    model = ViTRegModel(config).eval()
    with torch.no_grad():
        projection = model.embeddings.patch_embeddings.projection
        projection.weight -= projection.weight.mean(dim=(1, 2, 3), keepdim=True)
        projection.weight[MARKER] = 0.3 / projection.weight[0].numel()  # 0.3 x the mean normalised brightness
        for layer, unit in PLANTED:
            mlp = model.encoder.layer[layer].mlp
            mlp.fc1.weight[unit] = 0.0
            mlp.fc1.weight[unit, MARKER] = 4.0
            mlp.fc1.bias[unit] = -8.0
            mlp.fc2.weight[:, unit] = 0.0
            mlp.fc2.weight[OUTLIER, unit] = 5.0
        model.layernorm.weight[OUTLIER] = 8.0
    return model


def marked_images(num_marked: int = 8, num_clean: int = 4, seed: int = 0) -> list[Image.Image]:
    """`num_marked` noise images with 1-3 white patches each (where outliers form), then `num_clean` without."""
    rng = np.random.default_rng(seed)
    images = []
    for index in range(num_marked + num_clean):
        pixels = rng.uniform(0.3, 0.7, (SIDE, SIDE, 3))
        if index < num_marked:
            for row, col in rng.choice(SIDE // PATCH, size=(rng.integers(1, 4), 2)):
                pixels[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = 1.0
        images.append(Image.fromarray((pixels * 255).astype("uint8")))
    return images


def planted_processor() -> BitImageProcessor:
    """DINOv2's preprocessing at SIDE px with no enlargement before the crop: the marked images, SIDE x SIDE, reach
    the model as they are, their white squares on whole patches."""
    return image_processor(SIDE, resize_size=SIDE)


def write_planted_demo(model_dir: str | Path, images_dir: str | Path) -> None:
    """Write `planted_model()` as a ViTReg folder (with `planted_processor()`) and `marked_images()` as PNG files."""
    provenance = Provenance(kind="random", name="planted register neurons", description="A test model: see its code.")
    save_model_folder(planted_model(), model_dir, provenance, processor=planted_processor())
    Path(images_dir).mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(marked_images()):
        image.save(Path(images_dir) / f"image_{index:02d}.png")
