"""DINOv2's and DINOv3's preprocessing as a transformers image processor, and the real photos scikit-image ships."""

from pathlib import Path
from typing import TYPE_CHECKING

from transformers import BitImageProcessor

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # image files the tools read


def image_processor(crop_size: int = 224, resize_size: int | None = None, square: bool = False) -> BitImageProcessor:
    """DINOv2's preprocessing: bicubic resize of the short side to 256/224 of the crop, center crop, ImageNet norm.

    With `square`, DINOv3's (its README's and transformers' `DINOv3ViTImageProcessor`): the whole image resized to
    `crop_size x crop_size`, bilinear and antialiased, no crop, ImageNet norm.
    """
    resize_size = resize_size or round(crop_size * 256 / 224)
    common = {
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
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
