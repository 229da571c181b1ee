"""LOST single-object discovery (Siméoni et al., BMVC 2021) on last-layer keys, and its CorLoc over a VOC folder.

The paper's Table 3 measures it: high-norm artifacts make the key similarities meaningless where they sit, so
LOST's seed lands on them; registers fix it (DINOv2 VOC07 CorLoc 35.3 -> 55.4).
"""

import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import BaseImageProcessor, PreTrainedModel

from vitreg.core.errors import UserError

from .hooks import capture_last_qkv, split_heads
from .loading import open_image

LOST_PATCHES = 100  # k: the seed is expanded with its similar patches among the k lowest-degree ones (LOST's default)


@dataclass
class LostResult:
    """The discovered object: a box in the original image's pixels `(x0, y0, x1, y1)`, x1/y1 exclusive."""

    box: tuple[float, float, float, float]
    seed: tuple[int, int]  # (row, col) in the patch grid
    mask: np.ndarray  # [h, w] bool: the seed's connected component


def lost(
    keys: torch.Tensor, grid: tuple[int, int], k: int = LOST_PATCHES
) -> tuple[tuple[int, int, int, int], tuple[int, int], np.ndarray]:
    """LOST on patch keys `[hw, D]`: the object's box `(row0, col0, row1, col1)` (exclusive ends), seed and mask."""
    rows, cols = grid
    keys = keys.float()
    similarity = keys @ keys.T  # [hw, hw]
    # Background patches correlate positively with many others; the object with few: the seed has the lowest degree.
    degree = (similarity > 0).sum(dim=1)
    order = torch.argsort(degree, stable=True)
    seed = int(order[0])
    candidates = order[: min(k, order.numel())]
    similar = candidates[similarity[seed, candidates] > 0]  # holds the seed itself unless its key is zero
    votes = similarity[similar].sum(dim=0).reshape(rows, cols)  # [h, w]
    mask = component(votes.numpy() > 0, (seed // cols, seed % cols))
    mask[seed // cols, seed % cols] = True  # degenerate keys (all zero): the seed patch alone
    found = np.argwhere(mask)
    (row0, col0), (row1, col1) = found.min(axis=0), found.max(axis=0) + 1
    return (int(row0), int(col0), int(row1), int(col1)), (seed // cols, seed % cols), mask


def component(mask: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of True cells in `mask` that contains `seed`."""
    result = np.zeros_like(mask, dtype=bool)
    if not mask[seed]:
        return result
    result[seed] = True
    queue = deque([seed])
    while queue:
        row, col = queue.popleft()
        for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c] and not result[r, c]:
                result[r, c] = True
                queue.append((r, c))
    return result


def lost_pixels(processor: BaseImageProcessor, image: Image.Image, patch_size: int, short_side: int) -> torch.Tensor:
    """`[1, 3, H, W]`: the whole image, uncropped, short side resized to ~`short_side`, sides multiples of the patch."""
    scale = short_side / min(image.size)
    width, height = (max(patch_size, round(side * scale / patch_size) * patch_size) for side in image.size)
    pixels = torch.from_numpy(np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0)
    pixels = pixels.permute(2, 0, 1)  # [3, H, W]
    if processor.do_normalize:
        pixels = (pixels - torch.tensor(processor.image_mean).view(3, 1, 1)) / torch.tensor(processor.image_std).view(
            3, 1, 1
        )
    return pixels.unsqueeze(0)


@torch.no_grad()
def lost_image(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    image: Image.Image,
    short_side: int | None = None,
    k: int = LOST_PATCHES,
) -> LostResult:
    """The object LOST finds in `image`, from the keys of the model's last block, boxed in the image's pixels."""
    config = model.config
    short_side = short_side or processor.crop_size["height"]
    pixels = lost_pixels(processor, image, config.patch_size, short_side)  # [1, 3, H, W]
    param = next(model.parameters())
    with capture_last_qkv(model) as captured:
        model(pixels.to(device=param.device, dtype=param.dtype))
    _, keys, _ = split_heads(captured["qkv"], config.num_attention_heads)  # [1, heads, N, d]
    keys = keys[0, :, config.num_prefix_tokens :].transpose(0, 1).flatten(1).cpu()  # [hw, D], heads concatenated
    grid = (pixels.shape[-2] // config.patch_size, pixels.shape[-1] // config.patch_size)
    (row0, col0, row1, col1), seed, mask = lost(keys, grid, k)
    sx, sy = image.width / pixels.shape[-1], image.height / pixels.shape[-2]
    p = config.patch_size
    box = (col0 * p * sx, row0 * p * sy, min(col1 * p * sx, image.width), min(row1 * p * sy, image.height))
    return LostResult(box=tuple(float(v) for v in box), seed=seed, mask=mask)


def read_voc(root: str | Path, split: str | None = None) -> list[tuple[Path, list[list[float]]]]:
    """`(image path, boxes)` of a VOC-format folder; boxes `[x0, y0, x1, y1]` 0-based with exclusive ends."""
    root = Path(root)
    annotations, pictures = root / "Annotations", root / "JPEGImages"
    if not annotations.is_dir() or not pictures.is_dir():
        raise UserError(f"{root} is not a VOC-format folder (it needs Annotations/ and JPEGImages/)")
    if split is not None:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise UserError(f"{listing} does not exist")
        stems = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    else:
        stems = sorted(p.stem for p in annotations.glob("*.xml"))
    if not stems:
        raise UserError(f"{root} lists no annotated images")
    items = []
    for stem in stems:
        xml = annotations / f"{stem}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as error:
            raise UserError(f"{xml} is not a readable VOC annotation ({type(error).__name__})") from None
        filename = tree.findtext("filename") or f"{stem}.jpg"
        boxes = []
        for obj in tree.iter("object"):
            bndbox = obj.find("bndbox")
            if bndbox is None:
                continue
            try:
                x0, y0, x1, y1 = (float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise UserError(f"{xml} has an object with a malformed bndbox") from None
            boxes.append([x0 - 1, y0 - 1, x1, y1])  # VOC pixels are 1-based and inclusive
        if not boxes:
            raise UserError(f"{xml} has no object boxes")
        items.append((pictures / filename, boxes))
    return items


def iou(a: tuple | list, b: tuple | list) -> float:
    """Intersection over union of two `(x0, y0, x1, y1)` boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def corloc(
    model: PreTrainedModel,
    processor: BaseImageProcessor,
    voc_root: str | Path,
    split: str | None = None,
    short_side: int | None = None,
    k: int = LOST_PATCHES,
    progress: bool = True,
) -> dict:
    """LOST's CorLoc over a VOC folder: the share of images whose box has IoU >= 0.5 with a ground-truth box."""
    items = read_voc(voc_root, split)
    results = []
    for path, boxes in tqdm(items, desc="LOST", unit="image", disable=not progress):
        found = lost_image(model, processor, open_image(path), short_side, k)
        best = max(iou(found.box, box) for box in boxes)
        results.append(
            {
                "image": str(path),
                "box": [round(v, 2) for v in found.box],
                "gt_boxes": boxes,
                "iou": round(best, 4),
                "correct": best >= 0.5,
            }
        )
    return {
        "voc_root": str(voc_root),
        "split": split,
        "num_images": len(results),
        "corloc": sum(r["correct"] for r in results) / len(results),
        "images": results,
    }
