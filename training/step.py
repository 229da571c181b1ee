"""One optimizer step, as the training loop and the benchmarks run it."""

import torch
from accelerate import Accelerator
from torch import nn

from . import schedules
from .config import TrainConfig
from .objectives import OBJECTIVES
from .schedules import StepValues


def build_optimizer(student: nn.Module, num_layers: int, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over DINOv2's parameter groups (less what the objective exempts from weight decay); every group's lr and
    weight decay are set by `train_step`."""
    no_weight_decay = OBJECTIVES[config.objective].no_weight_decay
    groups = schedules.param_groups(student, num_layers, config, no_weight_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=(config.adam_beta1, config.adam_beta2))


class NonFiniteLoss(Exception):
    """The loss of a step is NaN or infinite on some process; nothing was updated."""

    def __init__(self, parts: dict[str, torch.Tensor]):
        self.parts = parts
        super().__init__(", ".join(f"{name}={value.item():.4g}" for name, value in parts.items()))


def train_step(
    accelerator: Accelerator,
    student: nn.Module,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    values: StepValues,
    clip_grad: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Schedules, forward and loss under autocast, backward, per-module clipping, AdamW, EMA teacher.

    Returns the loss and its parts (detached); raises NonFiniteLoss on every process, before any update, when the
    loss is not finite on one of them."""
    schedules.apply(optimizer, values)
    with accelerator.autocast():
        loss, parts = objective(student, batch, values)
    # One flag for all processes: a process that stopped alone would leave the others waiting in the backward pass.
    if accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "sum").item() > 0:
        raise NonFiniteLoss(parts)
    accelerator.backward(loss)
    model = accelerator.unwrap_model(student)
    if clip_grad:
        accelerator.unscale_gradients()  # fp16 loss scaling: clip the true gradients (a no-op otherwise)
        for module in objective.modules_to_clip(model):  # each module to its own norm, as DINOv2 clips
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    objective.update_teacher(model, values.momentum)
    return loss.detach(), parts
