"""Schedules as pure functions of the step (nothing to checkpoint) and the optimizer's parameter groups.

Every schedule takes at each step the value of DINOv2's `CosineScheduler` (dinov2/utils/utils.py, built in
dinov2/train/train.py); tests/test_official_dinov2.py checks them against it step by step.
"""

import math
import re
from dataclasses import dataclass

from torch import nn

from .config import TrainConfig


def cosine(step: int, base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """DINOv2's CosineScheduler: `warmup` steps evenly spaced from `warmup_start` to `base` (both included, so `base`
    is reached at step `warmup - 1`), then a cosine from `base` towards `final` over the other `total - warmup`
    steps; `final` from step `total` on."""
    if step >= total:
        return final
    if step < warmup:
        if warmup == 1:
            return warmup_start  # np.linspace(start, base, 1) == [start]
        return warmup_start + (base - warmup_start) * step / (warmup - 1)
    progress = (step - warmup) / (total - warmup)  # < 1: the cosine never quite reaches `final` before `total`
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * progress))


@dataclass
class StepValues:
    """Every scheduled value at one step."""

    lr: float
    last_layer_lr: float  # the lr of the prototypes: 0 while they are frozen, `lr` afterwards
    weight_decay: float
    momentum: float
    teacher_temp: float


def values_at(step: int, config: TrainConfig, peak_lr: float) -> StepValues:
    """The scheduled values of `step` (lr already scaled to the global batch)."""
    c = config
    lr = cosine(step, peak_lr, c.min_lr, c.max_steps, c.warmup_steps)
    # the teacher temperature: a linear warmup, then constant (DINOv2: base = final, total = warmup)
    warmup = c.warmup_teacher_temp_steps
    return StepValues(
        lr=lr,
        last_layer_lr=0.0 if step < c.freeze_last_layer_steps else lr,
        weight_decay=cosine(step, c.weight_decay, c.weight_decay_end, c.max_steps),
        momentum=cosine(step, c.momentum_teacher, c.final_momentum_teacher, c.max_steps),
        teacher_temp=cosine(step, c.teacher_temp, c.teacher_temp, warmup, warmup, c.warmup_teacher_temp),
    )


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings (tokens, registers, positions, patch projection), i + 1 for block i, num_layers + 1
    after (final norm, heads); registers sit at 0 as in DINOv2's current code (its April-2023 release had them at
    num_layers + 1, undecayed)."""
    block = re.search(r"encoder\.layer\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    return 0 if ".embeddings." in f".{name}" else num_layers + 1


def param_groups(
    model: nn.Module, num_layers: int, config: TrainConfig, no_weight_decay: tuple[str, ...] = ()
) -> list[dict]:
    """AdamW groups with `lr_mult` (layer-wise decay, patch-embed multiplier), `wd_mult` (0 for norms, biases,
    LayerScale, and parameters whose name ends with one of `no_weight_decay`) and `last_layer` (the prototypes, whose
    lr follows `last_layer_lr`), as DINOv2 builds them; groups share parameters with equal multipliers."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = config.layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embeddings" in name:
            lr_mult *= config.patch_embed_lr_mult
        no_decay = name.endswith((".bias", *no_weight_decay)) or "norm" in name or "layer_scale" in name
        wd_mult = 0.0 if no_decay else 1.0
        is_last_layer = ".last_layer." in name
        key = (lr_mult, wd_mult, is_last_layer)
        group = groups.setdefault(
            key, {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "last_layer": is_last_layer}
        )
        group["params"].append(param)
    return list(groups.values())


def apply(optimizer, values: StepValues) -> None:
    """Set every group's lr and weight decay for this step.

    A frozen last layer gets lr 0, as in DINOv2: its gradient still counts in the clipping norm and in Adam's
    moments, and AdamW's decoupled weight decay (lr * wd) vanishes with it."""
    for group in optimizer.param_groups:
        lr = values.last_layer_lr if group["last_layer"] else values.lr
        group["lr"] = lr * group["lr_mult"]
        group["weight_decay"] = values.weight_decay * group["wd_mult"]
