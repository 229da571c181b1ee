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
from vitreg.core.errors import UserError
from vitreg.core.images import check_image_size, crops, size_options
from vitreg.core.opening import model_name, open_model
from vitreg.modeling_vitreg import ViTRegModel

from .backends import BACKENDS
from .features import arrow_features, check_request, column_shapes, columns, num_registers, parse_what
from .inputs import Preprocessed, collate, datasets_module, list_images
from .output import FeatureFolder, refuse_finished

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORED = {"float32": "float32", "float16": "float16", "bfloat16": "float32"}  # Arrow has no bfloat16


class Transform:
    """PIL image -> `[3, H, W]` with the model's preprocessing (a picklable callable for the workers)."""

    def __init__(self, processor: BaseImageProcessor, options: dict):
        self.processor, self.options = processor, options

    def __call__(self, image) -> torch.Tensor:
        return self.processor(image, return_tensors="pt", **self.options)["pixel_values"][0]


def output_grid(processor: BaseImageProcessor, image_size: int | None, patch_size: int) -> tuple[int, int]:
    """The patch grid every image comes out at: `image_size` squared, else the processor's center crop (DINOv2) or
    fixed resize (DINOv3), refusing a size that does not tile into whole patches."""
    if image_size is not None:
        check_image_size(image_size, patch_size)
        return image_size // patch_size, image_size // patch_size
    if crops(processor):
        size = processor.crop_size
    else:  # a fixed resize, unless it resizes the short side only (or not at all): then sizes follow the images
        size = (getattr(processor, "size", None) or {}) if getattr(processor, "do_resize", False) else {}
    if not size.get("height") or not size.get("width"):
        raise UserError("the model's image processor gives no fixed image size: pass --image-size")
    for side in (size["height"], size["width"]):
        try:
            check_image_size(side, patch_size, flag="the model processor's image size")
        except UserError as error:
            raise UserError(f"{error}: pass --image-size") from None
    return size["height"] // patch_size, size["width"] // patch_size


def where(source: str | Path) -> str:
    """A local path as an absolute one, so that `photos` and `/home/me/photos` are the same job; anything else (a Hub
    id) as given."""
    path = Path(str(source)).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


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
    layers: str | list[int] | None = None,
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

    `model`: any source `vitreg.core.opening.open_model` opens, or a loaded `(model, processor)`. `what`: columns
    among cls, patch, registers (trained, then test-time), pooled; `layers`: 0-based blocks (`"0,5,10-11"`, `"-1"`
    or a list) whose normed tokens to keep instead of the final output. `image_size`: the side of the square the
    model sees (`vitreg.core.images.size_options`). A dataset's other columns are kept beside the features. A rerun
    with the same settings resumes: finished shards are kept. Returns the summary (`extract.json`).
    """
    datasets_module()  # the output is a `datasets` folder: say which extra is missing before any work
    output_dir = Path(output_dir)
    inputs = [source for source in (images, model) if isinstance(source, (str, Path))]
    refuse_finished(output_dir, overwrite, inputs)
    what = parse_what(what)
    if dtype not in DTYPES or backend not in BACKENDS:
        raise UserError(f"--dtype is one of {', '.join(DTYPES)}, --backend one of {', '.join(BACKENDS)}")
    if batch_size < 1 or shard_size < 1 or workers < 0:
        raise UserError("--batch-size and --shard-size must be at least 1, --workers at least 0")
    listed = list_images(images, split=split, image_column=image_column)
    if not len(listed):
        raise UserError(f"{images}: no images")
    # The device is the backend's to choose (ONNX Runtime runs on the CPU): the model is opened where it is.
    vit, processor, _ = open_model(model, revision=revision, head="model", device=None, progress=progress)
    name = where(model) if isinstance(model, (str, Path)) else model_name(vit)
    config = vit.config
    layers = check_request(config, what, layers)
    rows, cols = output_grid(processor, image_size, config.patch_size)
    shapes = column_shapes(config, what, rows * cols, None if layers is None else len(layers))
    others = listed.other_features()
    # num_register_tokens: the registers column's width, trained + test-time (one count, as `split_tokens` cuts).
    job = {
        "model": name, "revision": revision, "images": where(images), "split": split, "image_column": image_column,
        "columns": list(others), "num_images": len(listed),
        "ids_sha256": hashlib.sha256("\n".join(listed.ids).encode()).hexdigest()[:16],
        "image_size": [rows * config.patch_size, cols * config.patch_size], "grid": [rows, cols],
        "num_register_tokens": num_registers(config), "what": what, "layers": layers, "dtype": dtype,
        "shard_size": shard_size, "vitreg_version": vitreg.__version__,
    }  # fmt: skip
    num_shards = -(-len(listed) // shard_size)
    features = arrow_features(shapes, STORED[dtype], others)
    out = FeatureFolder(output_dir, job, features, num_shards, overwrite, inputs)
    todo = [shard for shard in range(num_shards) if shard not in out.finished()]
    if len(todo) < num_shards:
        logger.info(f"resuming: {num_shards - len(todo)} of {num_shards} shards already done")
    run = BACKENDS[backend](vit, layers, DTYPES[dtype], device)
    stored = np.dtype(STORED[dtype])
    plan = batches(todo, len(listed), shard_size, batch_size)
    loader = torch.utils.data.DataLoader(
        Preprocessed(listed, Transform(processor, size_options(processor, image_size))),
        batch_sampler=[indices for _, indices in plan],
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    features_of = lambda pixels: columns(run(pixels), what, stored)  # noqa: E731  [B, 3, H, W] -> columns
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
                ids = [listed.ids[index] for index in indices]
                writer.write({"id": ids, **listed.other_values(indices), **features_of(pixels)})
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
