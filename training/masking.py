"""iBOT block masking (BEiT's block-wise generator) and DINOv2's per-batch mask sampling."""

import math
import random

import torch


def block_mask(
    rows: int,
    cols: int,
    num_to_mask: int,
    rng: random.Random,
    min_patches: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A `[rows, cols]` bool mask of about `num_to_mask` patches, grown from random rectangular blocks."""
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    max_block = max(rows * cols // 2, 1)  # DINOv2: one block covers at most half of the image
    count = 0
    while count < num_to_mask:
        budget = min(num_to_mask - count, max_block)
        added = 0
        for _ in range(10):  # a few tries to place a block that adds new patches without overshooting
            area = rng.uniform(min(min_patches, budget), budget)
            ratio = math.exp(rng.uniform(*log_aspect))
            height, width = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if not (0 < height < rows and 0 < width < cols):
                continue
            top, left = rng.randint(0, rows - height), rng.randint(0, cols - width)
            block = mask[top : top + height, left : left + width]
            new = height * width - int(block.sum())
            if 0 < new <= budget:
                block.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def sample_masks(
    num_images: int,
    rows: int,
    cols: int,
    probability: float,
    ratio_min_max: tuple[float, float],
    rng: random.Random,
    min_patches: int = 4,
) -> torch.Tensor:
    """`[num_images, rows * cols]` masks: a `probability` share of images masked, ratios spread over the range."""
    num_masked = int(num_images * probability)
    ratios = torch.linspace(ratio_min_max[0], ratio_min_max[1], num_masked + 1).tolist()
    masks = [
        block_mask(rows, cols, int(rows * cols * rng.uniform(ratios[i], ratios[i + 1])), rng, min_patches).flatten()
        for i in range(num_masked)
    ]
    masks += [torch.zeros(rows * cols, dtype=torch.bool)] * (num_images - num_masked)
    rng.shuffle(masks)
    return torch.stack(masks)  # [num_images, rows * cols]
