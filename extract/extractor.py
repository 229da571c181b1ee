"""`extract_features`: images -> DataLoader workers (decode, resize) -> model -> Arrow shards, resumable.

Decoding and resizing run in worker processes while the main process runs the model, so the two overlap; each
batch stays inside one shard, and a shard is committed as soon as its last batch is written.
"""

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import BaseImageProcessor

import vitreg
from vitreg.conversion.loading import load_backbone
from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegModel

from .backends import BACKENDS
from .features import arrow_features, check_request, column_shapes, columns, parse_what
from .inputs import Preprocessed, collate, list_images
from .output import FeatureFolder, refuse_finished

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}  # Arrow has no bfloat16


def output_size(processor: BaseImageProcessor) -> dict | None:
    """`{"height", "width"}` every image comes out at: the center crop (DINOv2), or a resize of the whole image to a
    fixed size (DINOv3); None when the size depends on the image."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        return processor.crop_size
    size = getattr(processor, "size", None)
    if getattr(processor, "do_resize", False) and size and size.get("height") and size.get("width"):
        return size
    return None


def crop_options(image_size: int | None, processor: BaseImageProcessor) -> dict:
    """Processor overrides for `image_size`: DINOv3's whole-image resize for a processor that does it, else DINOv2's
    evaluation resize (short side 256/224 of it) and center crop."""
    if image_size is None:
        return {}
    square = {"height": image_size, "width": image_size}
    if output_size(processor) is not None and not getattr(processor, "do_center_crop", False):
        return {"size": square}
    return {"size": {"shortest_edge": round(image_size * 256 / 224)}, "crop_size": square, "do_center_crop": True}


class Transform:
    """PIL image -> `[3, H, W]` with the model's preprocessing (a picklable callable for the workers)."""

    def __init__(self, processor: BaseImageProcessor, options: dict):
        self.processor, self.options = processor, options

    def __call__(self, image) -> torch.Tensor:
        return self.processor(image, return_tensors="pt", **self.options)["pixel_values"][0]


def output_grid(processor: BaseImageProcessor, options: dict, patch_size: int) -> tuple[int, int]:
    """The patch grid of every image, refusing a crop that does not tile into whole patches."""
    crop = options.get("crop_size", options.get("size")) if options else output_size(processor)
    if crop is None:
        raise UserError("the model's image processor gives no fixed image size: pass --image-size")
    height, width = crop["height"], crop["width"]
    if height % patch_size or width % patch_size:
        raise UserError(f"--image-size {height}: not a multiple of the patch size {patch_size}")
    return height // patch_size, width // patch_size


def batches(shards: list[int], num_images: int, shard_size: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """`(shard, image indices)` of every batch, in order; a batch never spans two shards."""
    plan = []
    for shard in shards:
        indices = list(range(shard * shard_size, min((shard + 1) * shard_size, num_images)))
        plan += [(shard, indices[start : start + batch_size]) for start in range(0, len(indices), batch_size)]
    return plan


def extract_features(
    model: str | Path | tuple[ViTRegModel, BaseImageProcessor],
    images: str | Path,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    image_size: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    what: str | list[str] = "cls,patch",
    layers: list[int] | None = None,
    dtype: str = "float32",
    shard_size: int = 1000,
    split: str = "train",
    image_column: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    backend: str = "torch",
    progress: bool = True,
) -> dict:
    """Features of every image of a folder or `datasets` dataset, written as an Arrow dataset in `output_dir`.

    `model`: any source (`vitreg.conversion.loading.load_backbone`) or a loaded `(model, processor)`. `what`: columns
    among cls, patch, registers, pooled; `layers`: blocks whose normed tokens to keep instead of the final output.
    A rerun with the same settings resumes: finished shards are kept. Returns the summary (`extract.json`).
    """
    output_dir = Path(output_dir)
    refuse_finished(output_dir, overwrite)
    what = parse_what(what)
    if dtype not in DTYPES or backend not in BACKENDS:
        raise UserError(f"--dtype is one of {', '.join(DTYPES)}, --backend one of {', '.join(BACKENDS)}")
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise UserError("--batch-size and --shard-size must be at least 1, --workers at least 0")
    listed = list_images(images, split=split, image_column=image_column)
    if not len(listed):
        raise UserError(f"{images}: no images")
    if isinstance(model, tuple):
        (vit, processor), name = model, str(model[0].name_or_path or type(model[0]).__name__)
    else:
        (vit, processor), name = load_backbone(model, revision=revision, progress=progress), str(model)
    config = vit.config
    layers = check_request(config, what, layers)
    options = crop_options(image_size, processor)
    rows, cols = output_grid(processor, options, config.patch_size)
    shapes = column_shapes(config, what, rows * cols, None if layers is None else len(layers))
    job = {
        "model": name, "revision": revision, "images": str(images), "split": split, "image_column": image_column,
        "num_images": len(listed), "ids_sha256": hashlib.sha256("\n".join(listed.ids).encode()).hexdigest()[:16],
        "image_size": [rows * config.patch_size, cols * config.patch_size],
        "grid": [rows, cols], "num_register_tokens": config.num_register_tokens, "what": what, "layers": layers,
        "dtype": dtype, "shard_size": shard_size, "vitreg_version": vitreg.__version__,
    }  # fmt: skip
    num_shards = -(-len(listed) // shard_size)
    out = FeatureFolder(output_dir, job, arrow_features(shapes, STORED[dtype]), num_shards, overwrite)
    todo = [shard for shard in range(num_shards) if shard not in out.finished()]
    if len(todo) < num_shards:
        logger.info(f"resuming: {num_shards - len(todo)} of {num_shards} shards already done")
    run = BACKENDS[backend](vit, layers, DTYPES[dtype], device)
    stored = np.dtype(STORED[dtype])
    plan = batches(todo, len(listed), shard_size, batch_size)
    loader = torch.utils.data.DataLoader(
        Preprocessed(listed, Transform(processor, options)),
        batch_sampler=[indices for _, indices in plan],
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    features_of = lambda pixels: columns(run(pixels), config, what, stored)  # noqa: E731  [B, 3, H, W] -> columns
    count = _write(out, listed, plan, loader, features_of, strict, progress)
    seconds = time.perf_counter() - start
    summary = out.finish({"seconds": round(seconds, 3), "images_per_second": round(count / max(seconds, 1e-9), 3)})
    summary["images_this_run"] = count
    return summary


def _write(out: FeatureFolder, listed, plan: list, loader, features_of, strict: bool, progress: bool) -> int:
    """Batches from the workers -> features -> the shard writers, committing each shard after its last batch.

    Returns the images processed (written or skipped)."""
    done = len(listed) - sum(len(indices) for _, indices in plan)
    writer, count = None, 0
    bar = tqdm(total=len(listed), initial=done, unit="img", desc="extracting", disable=not progress)
    try:
        for position, ((shard, _), (indices, pixels, failed)) in enumerate(zip(plan, loader)):
            if writer is None:
                writer = out.writer(shard)
            for index, reason in failed:
                if strict:
                    raise UserError(f"{listed.ids[index]}: not a readable image ({reason}); drop --strict to skip it")
                writer.skipped.append([listed.ids[index], reason])
            if pixels is not None:
                writer.write({"id": [listed.ids[index] for index in indices], **features_of(pixels)})
            count += len(indices) + len(failed)
            bar.update(len(indices) + len(failed))
            if position + 1 == len(plan) or plan[position + 1][0] != shard:
                writer.commit()
                writer = None
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    return count
