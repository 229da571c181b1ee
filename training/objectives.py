"""The two objectives. Each is a module holding its non-trained state (EMA teacher, loss centers) that turns a
batch and the student into a loss; the student itself is what the optimizer trains and DDP / FSDP wraps."""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from vitreg.modeling_vitreg import ViTRegModel

from .config import TrainConfig
from .heads import DINOHead
from .losses import TeacherTargets, dino_loss, ibot_loss, koleo_loss
from .schedules import StepValues


class DINOv2Student(nn.Module):
    """Backbone (with registers) + DINO head (+ a separate iBOT head): CLS and masked-patch prototype scores."""

    def __init__(self, backbone: ViTRegModel, config: TrainConfig):
        super().__init__()
        dim = backbone.config.hidden_size
        head_kwargs = dict(
            hidden_dim=config.head_hidden_dim, bottleneck_dim=config.head_bottleneck_dim, n_layers=config.head_n_layers
        )
        self.backbone = backbone
        self.dino_head = DINOHead(dim, config.head_n_prototypes, **head_kwargs)
        self.ibot_head = DINOHead(dim, config.head_n_prototypes, **head_kwargs) if config.ibot_separate_head else None

    def patch_head(self) -> DINOHead:
        """The head of the iBOT loss."""
        return self.ibot_head if self.ibot_head is not None else self.dino_head

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        # Registers run through every block but only CLS and patch tokens reach a head.
        out = self.backbone(global_crops, bool_masked_pos=masks)  # CLS [2B, D], patches [2B, HW, D]
        cls_tokens = [out.pooler_output]
        if local_crops.shape[0]:
            cls_tokens.append(self.backbone(local_crops).pooler_output)  # [nB, D]
        result = {
            "backbone_cls": out.pooler_output,
            "cls_logits": self.dino_head(torch.cat(cls_tokens)),  # [(2 + n)B, K]
        }
        if masks is not None:
            result["patch_logits"] = self.patch_head()(out.patch_tokens[masks])  # [M, K]
        return result


class DINOv2Objective(nn.Module):
    """DINO + iBOT + KoLeo against an EMA teacher that sees the unmasked global crops."""

    def __init__(self, student: DINOv2Student, config: TrainConfig):
        super().__init__()
        self.config = config
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        targets = dict(
            method=config.centering, center_momentum=config.center_momentum, iterations=config.sinkhorn_iterations
        )
        self.dino_targets = TeacherTargets(config.head_n_prototypes, **targets)
        self.ibot_targets = TeacherTargets(config.head_n_prototypes, **targets)
        self.train()

    def train(self, mode: bool = True) -> "DINOv2Objective":
        super().train(mode)
        self.teacher.eval()  # no drop path in the teacher
        return self

    def forward(self, student: nn.Module, batch: dict, values: StepValues) -> tuple[torch.Tensor, dict]:
        """The weighted loss of one batch and its parts (detached)."""
        c = self.config
        use_ibot = c.ibot_loss_weight > 0
        masks = batch["masks"] if use_ibot else None  # [2B, HW]
        out = student(batch["global_crops"], batch["local_crops"], masks)
        with torch.no_grad():
            teacher = self.teacher.backbone(batch["global_crops"])
            teacher_cls = self.teacher.dino_head(teacher.pooler_output)  # [2B, K]
            cls_targets = self.dino_targets(teacher_cls, values.teacher_temp).chunk(2)  # 2 x [B, K]
            if use_ibot:
                teacher_patches = self.teacher.patch_head()(teacher.patch_tokens[masks])  # [M, K]
                patch_targets = self.ibot_targets(teacher_patches, values.teacher_temp)

        parts = {"dino_loss": dino_loss(out["cls_logits"].chunk(2 + c.local_crops_number), cls_targets, c.student_temp)}
        if c.koleo_loss_weight:
            parts["koleo_loss"] = sum(koleo_loss(cls) for cls in out["backbone_cls"].chunk(2))
        if use_ibot:
            parts["ibot_loss"] = ibot_loss(out["patch_logits"], patch_targets, masks, c.student_temp)
        weights = {"dino_loss": c.dino_loss_weight, "koleo_loss": c.koleo_loss_weight, "ibot_loss": c.ibot_loss_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        return loss, {name: value.detach() for name, value in parts.items()}

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student."""
        teacher_params = list(self.teacher.parameters())
        student_params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in student.parameters()]  # FSDP2
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(
            teacher_params, [p.detach().to(t.dtype) for p, t in zip(student_params, teacher_params)], alpha=1 - momentum
        )

    def export_model(self) -> ViTRegModel:
        """The model to publish: the teacher's backbone."""
        return self.teacher.backbone


class SupervisedObjective(nn.Module):
    """DeiT III: classification on soft (mixed) targets with BCE, or cross-entropy with label smoothing."""

    def __init__(self, config: TrainConfig):
        super().__init__()
        self.config = config

    def forward(self, student: nn.Module, batch: dict, values: StepValues) -> tuple[torch.Tensor, dict]:
        """The loss of one batch."""
        logits = student(pixel_values=batch["pixel_values"]).logits.float()  # [B, C]
        targets = batch["targets"]
        if self.config.label_smoothing:
            targets = targets * (1 - self.config.label_smoothing) + self.config.label_smoothing / targets.shape[1]
        if self.config.supervised_loss == "bce":
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        return loss, {"classification_loss": loss.detach()}

    def update_teacher(self, student: nn.Module, momentum: float) -> None:
        """No teacher in supervised training."""
