"""Inputs of an analysis: image files found in folders and read one at a time, the unreadable ones skipped and listed
as `vitreg extract` does, and the model's own preprocessing with `--image-size`'s one meaning.

Models are opened by `vitreg.core.opening.open_model`, as in every tool.
"""

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import BaseImageProcessor

from vitreg.core.errors import UserError
from vitreg.core.images import IMAGE_SUFFIXES, check_image_size, decode_errors, size_options

# What PIL raises on a damaged or foreign file (a truncated JPEG only when decoded: OSError in `convert`).
DECODE_ERRORS = decode_errors()  # the tools' one list of unreadable-image errors


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, or found in the named folders searched recursively and sorted (as extract does)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}), in no subfolder either")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return files


def read_image(path: str | Path) -> Image.Image:
    """An image file decoded as RGB; raises one of DECODE_ERRORS for an unreadable one."""
    with Image.open(path) as image:
        return image.convert("RGB")


def unreadable(error: BaseException) -> str:
    """Why an image could not be read, in one line (the reason `vitreg extract` lists)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {message}".strip().rstrip(":")


def open_image(path: str | Path) -> Image.Image:
    """An image file as RGB, or a UserError naming the file."""
    try:
        return read_image(path)
    except DECODE_ERRORS as error:
        raise UserError(f"{path} is not a readable image ({unreadable(error)})") from None


def readable_images(
    images: Sequence[str | Path | Image.Image], skipped: list[list[str]]
) -> Iterator[tuple[str, Image.Image]]:
    """`(name, RGB image)` of each readable item, opened one at a time (paths are named by the path, PIL images
    `image_<i>`); an unreadable file is appended to `skipped` as `[name, reason]` and passed over."""
    for index, image in enumerate(images):
        if isinstance(image, Image.Image):
            yield f"image_{index}", image.convert("RGB")
            continue
        try:
            decoded = read_image(image)
        except DECODE_ERRORS as error:
            skipped.append([str(image), unreadable(error)])
            continue
        yield str(image), decoded


def none_readable(skipped: Sequence[Sequence[str]]) -> UserError:
    """The error when every image was unreadable: how many, and the first with its reason."""
    name, reason = skipped[0]
    others = f" (and the {len(skipped) - 1} other images)" if len(skipped) > 1 else ""
    return UserError(f"{name} is not a readable image ({reason}){others}: nothing to analyse")


def preprocess(
    processor: BaseImageProcessor,
    image: Image.Image,
    patch_size: int,
    image_size: int | None = None,
    crop: bool = True,
) -> torch.Tensor:
    """`[1, 3, H, W]`: the model's own preprocessing, with `--image-size` and `--no-crop` as every tool means them
    (`vitreg.core.images.size_options`); a side that is not a multiple of the patch size is center-trimmed to one, as
    DINOv2 does."""
    if image_size is not None:
        check_image_size(image_size, patch_size)
    options = size_options(processor, image_size, crop)
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
