"""Inputs of an analysis: a model from any source with its image processor, and images, refused clearly if unusable."""

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from transformers import BaseImageProcessor, PreTrainedModel

from vitreg.conversion.loading import load_backbone
from vitreg.core.errors import UserError
from vitreg.core.images import IMAGE_SUFFIXES


def load_model(name_or_path: str | Path, revision: str | None = None) -> tuple[PreTrainedModel, BaseImageProcessor]:
    """Any model source as an eval-mode fp32 `ViTRegModel` and its image processor: a ViTReg folder or Hub repo, or a
    DINOv2 / timm / transformers checkpoint, Hub repo or official DINOv2 name, converted in memory."""
    return load_backbone(name_or_path, revision=revision)


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly or found (sorted, not recursively) in the named folders."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return files


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB, or a UserError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path} is not a readable image ({type(error).__name__})") from None


def check_images(paths: Iterable[str | Path]) -> None:
    """Refuse, before any model loads, a file that is not an image (reads only the headers)."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"{path} is not a readable image ({type(error).__name__})") from None


def named_images(images: Sequence[str | Path | Image.Image]) -> Iterator[tuple[str, Image.Image]]:
    """`(name, RGB image)` pairs, opened one at a time: paths are named by the path, PIL images `image_<i>`."""
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            yield f"image_{index}", image.convert("RGB")
        else:
            yield str(image), open_image(image)


def check_image_size(image_size: int, patch_size: int) -> None:
    """Refuse an `--image-size` that does not tile into whole patches."""
    if image_size <= 0 or image_size % patch_size:
        raise UserError(f"--image-size {image_size} is not a positive multiple of the patch size {patch_size}")


def preprocess(
    processor: BaseImageProcessor,
    image: Image.Image,
    patch_size: int,
    image_size: int | None = None,
    crop: bool = True,
) -> torch.Tensor:
    """`[1, 3, H, W]`: the model's own preprocessing, or the short side resized to `image_size` and cropped square.

    With `crop=False` the whole image is kept (short side resized, no square crop); any side that is not a multiple
    of the patch size is center-trimmed to one, as DINOv2 does.
    """
    options: dict = {} if crop else {"do_center_crop": False}
    if image_size is not None:
        check_image_size(image_size, patch_size)
        options["size"] = {"shortest_edge": image_size}
        options["crop_size"] = {"height": image_size, "width": image_size}
    pixel_values = processor(image, return_tensors="pt", **options)["pixel_values"]  # [1, 3, H, W]
    height, width = pixel_values.shape[-2:]
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise UserError(f"images of {height}x{width} pixels are smaller than one {patch_size}-pixel patch")
    top, left = (height - rows * patch_size) // 2, (width - cols * patch_size) // 2
    return pixel_values[..., top : top + rows * patch_size, left : left + cols * patch_size]  # [1, 3, h*p, w*p]


def unnormalize(processor: BaseImageProcessor, pixel_values: torch.Tensor) -> torch.Tensor:
    """`[1, 3, H, W]` model input back to `[H, W, 3]` RGB in [0, 1] for display."""
    mean = torch.tensor(processor.image_mean if processor.do_normalize else (0.0, 0.0, 0.0)).view(3, 1, 1)
    std = torch.tensor(processor.image_std if processor.do_normalize else (1.0, 1.0, 1.0)).view(3, 1, 1)
    image = pixel_values[0].float() * std + mean
    if not processor.do_rescale:
        image = image / 255.0
    return image.clamp(0, 1).permute(1, 2, 0)
