"""Schedules as pure functions of the step (nothing to checkpoint) and the optimizer's parameter groups."""

import math
import re
from dataclasses import dataclass

from torch import nn

from .config import TrainConfig


def cosine(step: int, start: float, end: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Linear warmup from `warmup_start` to `start` over `warmup` steps, then cosine to `end` at step `total`."""
    if step < warmup:
        return warmup_start + (start - warmup_start) * step / warmup
    if total <= warmup:
        return end
    progress = min(1.0, (step - warmup) / (total - warmup))
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, start: float, end: float, warmup: int) -> float:
    """Linear from `start` to `end` over `warmup` steps, then constant (DINOv2's teacher temperature)."""
    return end if step >= warmup else start + (end - start) * step / warmup


@dataclass
class StepValues:
    """Every scheduled value at one step."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    freeze_last_layer: bool


def values_at(step: int, config: TrainConfig, peak_lr: float) -> StepValues:
    """The scheduled values of `step` (lr already scaled to the global batch)."""
    c = config
    return StepValues(
        lr=cosine(step, peak_lr, c.min_lr, c.max_steps, c.warmup_steps),
        weight_decay=cosine(step, c.weight_decay, c.weight_decay_end, c.max_steps),
        momentum=cosine(step, c.momentum_teacher, c.final_momentum_teacher, c.max_steps),
        teacher_temp=linear_warmup(step, c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_steps),
        freeze_last_layer=step < c.freeze_last_layer_steps,
    )


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings (tokens, positions, patch projection), i + 1 for block i, num_layers + 1 after."""
    block = re.search(r"encoder\.layer\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    return 0 if ".embeddings." in f".{name}" else num_layers + 1


def param_groups(model: nn.Module, num_layers: int, config: TrainConfig) -> list[dict]:
    """AdamW groups with `lr_mult` (layer-wise decay, patch-embed multiplier) and `wd_mult` (0 for norms, biases,
    LayerScale), as DINOv2 builds them; groups share parameters with equal multipliers."""
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = config.layerwise_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embeddings" in name:
            lr_mult *= config.patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "layer_scale" in name
        wd_mult = 0.0 if no_decay else 1.0
        is_last_layer = ".last_layer." in name
        key = (lr_mult, wd_mult, is_last_layer)
        group = groups.setdefault(
            key, {"params": [], "lr_mult": lr_mult, "wd_mult": wd_mult, "last_layer": is_last_layer}
        )
        group["params"].append(param)
    return list(groups.values())


def apply(optimizer, values: StepValues) -> None:
    """Set every group's lr and weight decay for this step."""
    for group in optimizer.param_groups:
        group["lr"] = values.lr * group["lr_mult"]
        group["weight_decay"] = values.weight_decay * group["wd_mult"]
