"""DINOv2's official linear classifier heads (`*_linear_head.pth`, `*_linear4_head.pth`) and ImageNet label names."""

from pathlib import Path

import torch

from vitreg.core.errors import UserError

from .architectures import HEAD_KINDS
from .checkpoints import load_tensors


def imagenet_labels(num_classes: int) -> dict[int, str] | None:
    """ImageNet-1k class names from timm's bundled metadata (offline), or None when unavailable."""
    if num_classes != 1000:
        return None
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return None
    info = ImageNetInfo("imagenet-1k")
    return {index: info.index_to_description(index) for index in range(num_classes)}


def load_official_head(path: str | Path, hidden_size: int) -> tuple[dict[str, torch.Tensor], int]:
    """`classifier.{weight,bias}` of an official head file and how many blocks' CLS tokens it reads (1 or 4)."""
    path = Path(path)
    tensors = load_tensors(path)
    if set(tensors) != {"weight", "bias"}:
        raise UserError(
            f"{path.name}: not an official linear head (expected keys weight, bias; found "
            f"{', '.join(sorted(tensors)[:4])})"
        )
    weight, bias = tensors["weight"], tensors["bias"]  # [classes, (1 + L) * D], [classes]
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise UserError(f"{path.name}: head weight {list(weight.shape)} and bias {list(bias.shape)} do not match")
    blocks, remainder = divmod(weight.shape[1], hidden_size)
    if remainder or blocks - 1 not in HEAD_KINDS.values():
        raise UserError(
            f"{path.name}: a head for {weight.shape[1]} input features does not fit a backbone of width {hidden_size} "
            f"(expected {2 * hidden_size} for linear or {5 * hidden_size} for linear4)"
        )
    return {"classifier.weight": weight, "classifier.bias": bias}, blocks - 1
