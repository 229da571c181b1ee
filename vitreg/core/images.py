"""DINOv2's preprocessing as a transformers image processor, and the real photos scikit-image ships."""

from pathlib import Path

from transformers import BitImageProcessor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")


def image_processor(crop_size: int = 224, resize_size: int | None = None) -> BitImageProcessor:
    """DINOv2's preprocessing: bicubic resize of the short side to 256/224 of the crop, center crop, ImageNet norm."""
    resize_size = resize_size or round(crop_size * 256 / 224)
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": crop_size, "width": crop_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def sample_photos(folder: str | Path, names: tuple[str, ...] = SAMPLE_PHOTOS) -> list[Path]:
    """Save real photographs shipped by scikit-image (no download) as JPEG files in `folder`; return their paths."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB").save(path, quality=95)
        paths.append(path)
    return paths
