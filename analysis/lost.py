"""LOST single-object discovery (Siméoni et al., BMVC 2021) as its official code computes it, and CorLoc over VOC.

The paper's Table 3 measures it: high-norm artifacts make the key similarities meaningless where they sit, so
LOST's seed lands on them; registers fix it (DINOv2 VOC07 CorLoc 35.3 -> 55.4).

What valeoai/LOST's main_lost.py does, and so what this does (tests/test_analysis_lost.py compares the outputs with
the official functions' on stored inputs, see scripts/lost_reference.py):
- the image at its own resolution: ToTensor and the normalisation (ImageNet's for DINOv2), then zero-padded at the
  bottom and right to a multiple of the patch size (after normalisation: the padding is the mean colour);
- features: the keys of the last block, heads concatenated, patch tokens only (CLS and registers left out);
- similarity `A = K K^T`; a patch's degree counts its positive similarities to the other patches; the seed has the
  lowest. Ties are broken as LOST's `torch.argsort(-degree, descending=True)` breaks them (torch's unstable sort),
  by making the same call on the same device;
- expansion: among the k lowest-degree patches, those similar (A > 0) to the seed; their rows of A summed are votes;
- box: the connected component of positive votes that holds the seed (scipy.ndimage.label: 4-connected), its
  bounding patches times the patch size, the right and bottom edges clipped to the image (they can be in the padding);
- CorLoc: `ImageSets/Main/trainval.txt` (the split the papers report), every object's box, difficult and truncated
  ones too (LOST's default), 1-based VOC pixels made 0-based; an image is correct when LOST's IoU (float32, with its
  1e-7 epsilons) is >= 0.5 with any of them.
"""

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import BaseImageProcessor, PreTrainedModel
from transformers.utils import logging

from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import split_tokens

from .hooks import capture_last_qkv, split_heads
from .loading import DECODE_ERRORS, none_readable, read_image, unreadable

logger = logging.get_logger(__name__)

LOST_PATCHES = 100  # k: the seed is expanded with its similar patches among the k lowest-degree ones (LOST's default)
DEFAULT_SPLIT = "trainval"  # VOC07 / VOC12 trainval: what LOST and the registers paper report
ALL_ANNOTATIONS = "all"  # split name meaning every file in Annotations/
FEATURES = "keys of the last block (heads concatenated)"
IOU_EPS = 1e-7  # LOST's bbox_iou adds it to heights and to the union; it decides boxes whose IoU is exactly 0.5


class LostError(ValueError):
    """LOST finds no object: the seed patch gets no positive vote (its key is zero). The official code raises too."""


@dataclass
class LostResult:
    """The object LOST finds: its box in pixels `(x0, y0, x1, y1)` (exclusive ends), seed, votes and component."""

    box: tuple[int, int, int, int]
    seed: tuple[int, int]  # (row, col) in the patch grid
    expanded: list[int]  # row-major indices of the patches whose similarities were summed into the votes
    mask: np.ndarray  # [h, w] bool: the seed's connected component of positive votes

    @property
    def grid_box(self) -> tuple[int, int, int, int]:
        """`(row0, col0, row1, col1)`: the component's bounding patches, exclusive ends."""
        return bounding_patches(self.mask)


def bounding_patches(mask: np.ndarray) -> tuple[int, int, int, int]:
    """`(row0, col0, row1, col1)` of the True cells of a non-empty `[h, w]` mask, exclusive ends."""
    found = np.argwhere(mask)
    (row0, col0), (row1, col1) = found.min(axis=0), found.max(axis=0) + 1
    return int(row0), int(col0), int(row1), int(col1)


def lost(
    keys: torch.Tensor,
    grid: tuple[int, int],
    k: int = LOST_PATCHES,
    patch_size: int = 1,
    image_size: tuple[int, int] | None = None,
) -> LostResult:
    """LOST on patch keys `[hw, D]` of an `(h, w)` grid; the box in pixels of an `(H, W)` image (default: patches)."""
    rows, cols = grid
    if keys.ndim != 2 or keys.shape[0] != rows * cols:
        raise ValueError(f"keys of shape {tuple(keys.shape)} do not fit a {rows}x{cols} grid")
    keys = keys.float()[None]  # [1, hw, D]
    similarity = (keys @ keys.transpose(1, 2))[0]  # [hw, hw], batched like LOST's, for the same rounding
    positive = similarity > 0
    positive.fill_diagonal_(False)  # a patch's similarity to itself is no edge
    # Many patches share the lowest degree: LOST's exact call (same values, same device) gives its tie order.
    order = torch.argsort(-positive.sum(dim=1).float(), descending=True)
    seed = order[0]
    candidates = order[:k]
    expanded = candidates[similarity[seed, candidates] > 0]  # holds the seed itself unless its key is zero
    votes = similarity[expanded].sum(dim=0).reshape(rows, cols).cpu().numpy()  # [h, w]
    seed_patch = divmod(int(seed), cols)
    components, _ = scipy.ndimage.label(votes > 0)  # [h, w] labels of the 4-connected components, 0: no vote
    if components[seed_patch] == 0:
        raise LostError(f"the seed patch {seed_patch} gets no positive vote (a zero key): LOST finds no object")
    mask = components == components[seed_patch]
    row0, col0, row1, col1 = bounding_patches(mask)
    height, width = image_size or (rows * patch_size, cols * patch_size)
    p = patch_size
    box = (col0 * p, row0 * p, min(col1 * p, width), min(row1 * p, height))  # the far edges may lie in the padding
    return LostResult(box=box, seed=seed_patch, expanded=expanded.tolist(), mask=mask)


def lost_pixels(processor: BaseImageProcessor, image: Image.Image, patch_size: int) -> torch.Tensor:
    """`[1, 3, H', W']`: the image at its own resolution, normalised, zero-padded bottom and right to whole patches."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)  # as ToTensor
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
        pixels = (pixels - mean) / std
    height, width = pixels.shape[-2:]
    padded = torch.zeros(3, math.ceil(height / patch_size) * patch_size, math.ceil(width / patch_size) * patch_size)
    padded[:, :height, :width] = pixels
    return padded[None]


@torch.no_grad()
def lost_image(
    model: PreTrainedModel, processor: BaseImageProcessor, image: Image.Image, k: int = LOST_PATCHES
) -> LostResult:
    """The object LOST finds in `image` at its own resolution, from the keys of the model's last block."""
    config = model.config
    pixels = lost_pixels(processor, image, config.patch_size)  # [1, 3, H', W']
    param = next(model.parameters())
    with capture_last_qkv(model) as captured:
        model(pixels.to(device=param.device, dtype=param.dtype))
    # A RoPE model's keys are taken before their rotation: LOST compares what patches contain, not where they are.
    _, keys, _ = split_heads(captured["qkv"], config.num_attention_heads)  # [1, heads, P + hw, d]
    _, _, keys = split_tokens(config, keys.transpose(1, 2).flatten(2))  # [1, hw, D], heads concatenated
    grid = (pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size)
    return lost(keys[0], grid, k, config.patch_size, (image.height, image.width))


def lost_settings(patch_size: int, k: int) -> dict:
    """How LOST ran, as the report states it."""
    return {
        "resolution": f"native, zero-padded to multiples of {patch_size} px",
        "patch_size": patch_size,
        "features": FEATURES,
        "k": k,
    }


def _coordinate(text: str | None) -> int | float:
    value = float(text)  # raises on None / garbage: the caller turns that into a UserError
    return int(value) if value.is_integer() else value


def read_voc(root: str | Path, split: str = DEFAULT_SPLIT) -> list[tuple[Path, list[list[int | float]]]]:
    """`(JPEGImages/<id>.jpg, boxes)` of a VOC folder's `split` (`"all"`: every annotation), boxes as LOST reads them.

    A box is `[xmin - 1, ymin - 1, xmax, ymax]`: VOC's 1-based inclusive pixels as 0-based, exclusive ends. Every
    object counts, difficult and truncated ones included (LOST's default; its --no_hard is not reproduced).
    """
    root = Path(root)
    annotations, pictures = root / "Annotations", root / "JPEGImages"
    if not annotations.is_dir() or not pictures.is_dir():
        inner = sorted(root.glob("VOCdevkit/VOC20*")) + sorted(root.glob("VOC20*"))
        hint = f"; did you mean {inner[0]}?" if inner else ""
        raise UserError(f"{root} is not a VOC-format folder (it needs Annotations/ and JPEGImages/){hint}")
    if split == ALL_ANNOTATIONS:
        stems = sorted(p.stem for p in annotations.glob("*.xml"))
    else:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise UserError(
                f"{listing} does not exist: choose another split with --split NAME (ImageSets/Main/NAME.txt), "
                f"or --split {ALL_ANNOTATIONS} for every annotation"
            )
        stems = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not stems:
        raise UserError(f"{root} lists no annotated images for the split {split!r}")
    items = []
    for stem in stems:
        xml = annotations / f"{stem}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as error:
            raise UserError(f"{xml} is not a readable VOC annotation ({type(error).__name__})") from None
        boxes = []
        for obj in tree.iter("object"):
            bndbox = obj.find("bndbox")
            if bndbox is None:
                continue
            try:
                x0, y0, x1, y1 = (_coordinate(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise UserError(f"{xml} has an object with a malformed bndbox") from None
            boxes.append([x0 - 1, y0 - 1, x1, y1])
        if not boxes:
            raise UserError(f"{xml} has no object boxes")  # LOST's evaluation fails on such an image too
        items.append((pictures / f"{stem}.jpg", boxes))  # torchvision's VOCDetection, which LOST uses, names it so
    return items


def box_ious(box, gt_boxes) -> torch.Tensor:
    """`[n]` IoU of an `(x0, y0, x1, y1)` box with `n` boxes, computed as LOST's `bbox_iou` (float32, its epsilons)."""
    box, gt = torch.as_tensor(box), torch.as_tensor(gt_boxes).reshape(-1, 4).T  # [4], [4, n]
    width = (torch.min(box[2], gt[2]) - torch.max(box[0], gt[0])).clamp(0)
    height = (torch.min(box[3], gt[3]) - torch.max(box[1], gt[1])).clamp(0)
    inter = width * height
    area, gt_area = (box[2] - box[0]) * (box[3] - box[1] + IOU_EPS), (gt[2] - gt[0]) * (gt[3] - gt[1] + IOU_EPS)
    return inter / (area + gt_area - inter + IOU_EPS)


def iou(a, b) -> float:
    """Intersection over union of two `(x0, y0, x1, y1)` boxes, as LOST computes it."""
    return float(box_ious(a, [b])[0])


def corloc(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    voc_root: str | Path,
    split: str = DEFAULT_SPLIT,
    k: int = LOST_PATCHES,
    progress: bool = True,
) -> dict:
    """LOST's CorLoc over a VOC folder's split: the share of images whose box has IoU >= 0.5 with a ground-truth box.

    An unreadable image is skipped and listed in `skipped` (`[path, reason]`), not counted.
    """
    items = read_voc(voc_root, split)
    settings = lost_settings(model.config.patch_size, k)
    logger.info(f"LOST on {len(items)} images of {voc_root} ({split}): {', '.join(map(str, settings.values()))}")
    results, skipped = [], []
    for path, boxes in tqdm(items, desc="LOST", unit="image", disable=not progress):
        try:
            image = read_image(path)
        except DECODE_ERRORS as error:
            skipped.append([str(path), unreadable(error)])
            continue
        entry = {"image": str(path), "size": [image.width, image.height], "gt_boxes": boxes}
        try:
            found = lost_image(model, processor, image, k)
        except LostError as error:  # the official code stops here; one degenerate image is one miss
            logger.warning(f"{path}: {error}")
            results.append({**entry, "box": None, "seed": None, "iou": 0.0, "correct": False, "error": str(error)})
            continue
        ious = box_ious(found.box, boxes)
        results.append(
            {
                **entry,
                "box": list(found.box),
                "seed": list(found.seed),
                "iou": round(float(ious.max()), 4),
                "correct": bool((ious >= 0.5).any()),
            }
        )
    if not results:
        raise none_readable(skipped)
    return {
        "voc_root": str(voc_root),
        "split": split,
        **settings,
        "num_images": len(results),
        "corloc": sum(r["correct"] for r in results) / len(results),
        "images": results,
        "skipped": skipped,
    }
