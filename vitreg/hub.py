"""Writing a ViTReg folder that is a ready Hub repository: weights, config + remote code, processor, card."""

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import BitImageProcessor, PreTrainedModel

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite`; refuse a file in its place."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise UserError(f"{output_dir} is not empty; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `output_dir` that replaces it only if the block succeeds."""
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
        check_output_dir(output_dir, overwrite)  # nobody wrote there meanwhile
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            output_dir.rename(retired / "old")
            staging.rename(output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(output_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def save_model_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    provenance: dict,
    *,
    overwrite: bool = False,
    crop_size: int = 224,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` as a Hub-ready folder (safetensors, config with auto_map + code, processor, card), atomically."""
    import model_cards  # imported here: model_cards itself loads models through this package

    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        image_processor(crop_size).save_pretrained(staging)
        model_cards.write_card(staging, provenance)
    return output_dir
