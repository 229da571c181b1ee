"""DINOv2's and DINOv3's preprocessing as a transformers image processor, and the real photos scikit-image ships."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BaseImageProcessor, BitImageProcessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3's README: the SAT-493M (satellite) weights are normalised with their pretraining data's statistics.
SATELLITE_MEAN = (0.430, 0.411, 0.296)
SATELLITE_STD = (0.213, 0.156, 0.143)
# Six different photographs (scikit-image's `cat` is `chelsea` again, so it is not among them).
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # image files the tools read


def image_processor(
    crop_size: int = 224, resize_size: int | None = None, square: bool = False, satellite: bool = False
) -> "BitImageProcessor":
    """DINOv2's preprocessing: bicubic resize of the short side to 256/224 of the crop, center crop, ImageNet norm.

    With `square`, DINOv3's (its README's and transformers' `DINOv3ViTImageProcessor`): the whole image resized to
    `crop_size x crop_size`, bilinear and antialiased, no crop, ImageNet norm. With `satellite`, DINOv3's SAT-493M
    mean and std instead of ImageNet's.
    """
    from transformers import BitImageProcessor

    resize_size = resize_size or round(crop_size * 256 / 224)
    common = {
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(SATELLITE_MEAN if satellite else IMAGENET_MEAN),
        "image_std": list(SATELLITE_STD if satellite else IMAGENET_STD),
        "do_convert_rgb": True,
    }
    if square:
        size = {"height": crop_size, "width": crop_size}
        return BitImageProcessor(size=size, resample=2, do_center_crop=False, **common)  # 2: PIL.Image.BILINEAR
    return BitImageProcessor(
        size={"shortest_edge": resize_size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": crop_size, "width": crop_size},
        **common,
    )


def decode_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for an image file it cannot read (not an image, truncated, corrupt, a decompression bomb)."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def default_processor(config: Any, *, satellite: bool = False, crop_size: int = 224) -> "BitImageProcessor":
    """The processor of a model whose source has none, by the one policy every tool and every saved folder follows:
    DINOv3's whole-image resize for RoPE models, DINOv2's resize and center crop otherwise; `satellite`: the SAT-493M
    statistics."""
    return image_processor(crop_size, square=bool(getattr(config, "uses_rope", False)), satellite=satellite)


def is_satellite(*names: str | None) -> bool:
    """Whether a source named so holds DINOv3's SAT-493M weights (official names and files say `sat493m`)."""
    return any(name and "sat493m" in str(name).lower().replace("-", "").replace("_", "") for name in names)


def check_image_size(image_size: int, patch_size: int, flag: str = "--image-size") -> None:
    """Refuse a size that does not tile into whole patches (the one divisibility check of every tool)."""
    if image_size <= 0 or image_size % patch_size:
        raise UserError(f"{flag} {image_size} is not a positive multiple of the patch size {patch_size}")


def crops(processor: "BaseImageProcessor") -> bool:
    """Whether `processor` center-crops (DINOv2's) rather than resizing the whole image (DINOv3's)."""
    return bool(getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None))


def size_options(processor: "BaseImageProcessor", image_size: int | None = None, crop: bool = True) -> dict:
    """Call-time overrides of `processor` for `--image-size N` (its one meaning in every tool) and `--no-crop`.

    N is the side of the square the model sees: a cropping processor resizes the short side by its own resize/crop
    ratio (DINOv2: 256/224) and center-crops N x N; a processor that does not crop resizes the whole image to N x N.
    Without crop, the short side is resized to N (default: the processor's own size) and the whole image kept.
    """
    if not crop:
        options: dict = {"do_center_crop": False}
        if image_size is not None:
            options["size"] = {"shortest_edge": image_size}
        elif "shortest_edge" not in (getattr(processor, "size", None) or {}):
            side = min(processor.size["height"], processor.size["width"])  # a square resize: its side
            options["size"] = {"shortest_edge": side}
        return options
    if image_size is None:
        return {}
    if not crops(processor):
        return {"size": {"height": image_size, "width": image_size}}
    resize = (processor.size or {}).get("shortest_edge")
    ratio = resize / processor.crop_size["height"] if resize else 256 / 224
    return {
        "size": {"shortest_edge": round(image_size * ratio)},
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
    }


def sample_images(names: tuple[str, ...] = SAMPLE_PHOTOS, max_side: int | None = None) -> list["Image.Image"]:
    """Real photographs shipped by scikit-image (no download) as RGB PIL images, optionally shrunk to `max_side`."""
    import numpy as np
    from PIL import Image
    from skimage import data

    images = []
    for name in names:
        array = np.asarray(getattr(data, name)())
        if array.dtype == bool:  # e.g. `horse` is a binary silhouette
            array = array.astype(np.uint8) * 255
        image = Image.fromarray(array).convert("RGB")
        if max_side is not None:
            image.thumbnail((max_side, max_side))
        images.append(image)
    return images


def sample_photos(
    folder: str | Path,
    names: tuple[str, ...] = SAMPLE_PHOTOS,
    *,
    max_side: int | None = None,
    by_colour: bool = False,
) -> list[Path]:
    """Write `sample_images` as JPEG files into `folder`; with `by_colour`, an imagefolder of two classes
    (`color/`, `gray/`: whether scikit-image ships the photo in colour), as the supervised tests train on."""
    import numpy as np

    folder = Path(folder)
    paths = []
    for name, image in zip(names, sample_images(names, max_side)):
        grey = bool(np.array_equal(*np.asarray(image).transpose(2, 0, 1)[:2]))  # R == G: a greyscale original
        target = folder / ("gray" if grey else "color") if by_colour else folder
        target.mkdir(parents=True, exist_ok=True)
        path = target / f"{name}.jpg"
        image.save(path, quality=95)
        paths.append(path)
    return paths
