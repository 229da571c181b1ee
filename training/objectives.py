"""The two objectives. Each is a module holding its non-trained state (EMA teacher, loss centers) that turns a
batch and the student into a loss, and owns what else differs between them: the student it trains, its data
pipeline, the modules whose gradients are clipped separately, the values it logs and the model it publishes.
The student itself is what the optimizer trains and DDP / FSDP wraps."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegForImageClassification, ViTRegModel

from . import data
from .augment import MultiCrop, ThreeAugment
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

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the backbone's blocks in the backward pass instead of keeping their activations."""
        self.backbone.gradient_checkpointing_enable()

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor, masks: torch.Tensor, patch_logits: bool = True
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
        if patch_logits:
            result["patch_logits"] = self.patch_head()(out.patch_tokens[masks])  # [M, K]
        return result


class DINOv2Objective(nn.Module):
    """DINO + iBOT + KoLeo against an EMA teacher that sees the unmasked global crops, composed as DINOv2's
    `ssl_meta_arch.forward_backward` composes them."""

    # DINOv2 decays every weight but biases, norms and LayerScale: tokens and position embeddings included.
    no_weight_decay: tuple[str, ...] = ()

    def __init__(self, student: DINOv2Student, config: TrainConfig):
        super().__init__()
        self.config = config
        self.teacher = copy.deepcopy(student).requires_grad_(False)
        targets = dict(
            method=config.centering, center_momentum=config.center_momentum, iterations=config.sinkhorn_iterations
        )
        self.dino_targets = TeacherTargets(config.head_n_prototypes, **targets)
        self.ibot_targets = TeacherTargets(config.head_n_prototypes, per_process_mean=True, **targets)
        self.train()

    @staticmethod
    def model_config_kwargs(config: TrainConfig, images) -> dict:
        """What the objective adds to the student's ViTRegConfig: the mask token that replaces the masked patches of
        the global crops (off by default in ViTRegConfig; the exported teacher keeps it, as DINOv2's checkpoints)."""
        return dict(use_mask_token=True)

    @staticmethod
    def build_student(model_config: ViTRegConfig, config: TrainConfig) -> DINOv2Student:
        """A fresh backbone with the DINO (and iBOT) heads."""
        return DINOv2Student(ViTRegModel(model_config), config)

    @staticmethod
    def data_pipeline(config: TrainConfig, patch_size: int, images) -> tuple:
        """(per-image transform, collate, label column): multi-crop, crop-major batches with iBOT masks, no labels."""
        c = config
        transform = MultiCrop(
            c.global_crop_size,
            c.global_crops_scale,
            c.local_crops_number,
            c.local_crop_size,
            c.local_crops_scale,
            c.blur_convention,
        )
        return transform, data.DINOv2Collate(c, patch_size), None

    @staticmethod
    def leaves_parameters_unused(config: TrainConfig) -> bool:
        """Whether a step leaves trained parameters out of the graph (DDP must look for them): a separate iBOT head
        without the iBOT loss."""
        return config.ibot_separate_head and not config.ibot_loss_weight

    def train(self, mode: bool = True) -> "DINOv2Objective":
        super().train(mode)
        self.teacher.eval()  # no drop path in the teacher
        return self

    def forward(self, student: nn.Module, batch: dict, values: StepValues) -> tuple[torch.Tensor, dict]:
        """The weighted loss of one batch and its parts (detached)."""
        use_ibot = self.config.ibot_loss_weight > 0
        masks = batch["masks"]  # [2B, HW]; as in DINOv2 the student's global crops are masked even without iBOT
        out = student(batch["global_crops"], batch["local_crops"], masks, use_ibot)
        teacher_cls, teacher_patches = self.teacher_scores(batch["global_crops"], masks if use_ibot else None)
        return self.loss(out, teacher_cls, teacher_patches, masks, values.teacher_temp)

    @torch.no_grad()
    def teacher_scores(
        self, global_crops: torch.Tensor, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's prototype scores on the unmasked global crops: CLS `[2B, K]`, masked patches `[M, K]`."""
        out = self.teacher.backbone(global_crops)
        cls = self.teacher.dino_head(out.pooler_output)
        return cls, self.teacher.patch_head()(out.patch_tokens[masks]) if masks is not None else None

    def loss(
        self,
        student_out: dict[str, torch.Tensor],
        teacher_cls: torch.Tensor,
        teacher_patches: torch.Tensor | None,
        masks: torch.Tensor,
        teacher_temp: float,
    ) -> tuple[torch.Tensor, dict]:
        """DINO + KoLeo (+ iBOT when `teacher_patches` is given) of the heads' outputs; updates the centers.

        Equal to DINOv2's total: its global-crop DINO term (doubled by `loss_scales`) plus the local one is our
        `dino_loss`; its iBOT term is `forward_masked * loss_scales * ibot_loss_scale = forward_masked * 2 * 1/2`;
        its KoLeo term is `koleo_loss_weight` times the sum over the two global crops."""
        c = self.config
        cls_targets = self.dino_targets(teacher_cls, teacher_temp).chunk(2)  # 2 x [B, K]
        student_views = student_out["cls_logits"].chunk(2 + c.local_crops_number)  # global crops first
        parts = {"dino_loss": dino_loss(student_views, cls_targets, c.student_temp)}
        if c.koleo_loss_weight:  # never between the two crops of one image
            parts["koleo_loss"] = sum(koleo_loss(cls) for cls in student_out["backbone_cls"].chunk(2))
        if teacher_patches is not None:
            patch_targets = self.ibot_targets(teacher_patches, teacher_temp)  # [M, K]
            parts["ibot_loss"] = ibot_loss(student_out["patch_logits"], patch_targets, masks, c.student_temp)
        weights = {"dino_loss": c.dino_loss_weight, "koleo_loss": c.koleo_loss_weight, "ibot_loss": c.ibot_loss_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        return loss, {name: value.detach() for name, value in parts.items()}

    def modules_to_clip(self, student: DINOv2Student) -> list[nn.Module]:
        """DINOv2 clips the backbone, the DINO head and the iBOT head each to `clip_grad` on its own."""
        return [module for module in (student.backbone, student.dino_head, student.ibot_head) if module is not None]

    @torch.no_grad()
    def update_teacher(self, student: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student."""
        teacher_params = list(self.teacher.parameters())
        student_params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in student.parameters()]  # FSDP2
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(
            teacher_params, [p.detach().to(t.dtype) for p, t in zip(student_params, teacher_params)], alpha=1 - momentum
        )

    def values_to_log(self, values: StepValues) -> dict[str, float]:
        """The scheduled values of this objective beyond lr and weight decay."""
        return {"last_layer_lr": values.last_layer_lr, "momentum": values.momentum, "teacher_temp": values.teacher_temp}

    def export_model(self, student: nn.Module) -> ViTRegModel:
        """The model to publish: the teacher's backbone."""
        return self.teacher.backbone


class SupervisedObjective(nn.Module):
    """DeiT III: classification on soft (mixed) targets with BCE, or cross-entropy with label smoothing."""

    # DeiT III (through timm's optimizer factory) exempts the model's `no_weight_decay()` names, pos_embed and
    # cls_token, and every 1-D parameter from weight decay; ViTReg's registers are tokens like CLS.
    no_weight_decay: tuple[str, ...] = (
        "embeddings.position_embeddings",
        "embeddings.cls_token",
        "embeddings.register_tokens",
    )

    def __init__(self, student: ViTRegForImageClassification, config: TrainConfig):
        super().__init__()
        self.config = config

    @staticmethod
    def model_config_kwargs(config: TrainConfig, images) -> dict:
        """The classes of the dataset, and no mask token (a classifier never masks patches)."""
        names = data.class_names(images, config.label_column)
        return dict(
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            use_mask_token=False,
        )

    @staticmethod
    def build_student(model_config: ViTRegConfig, config: TrainConfig) -> ViTRegForImageClassification:
        """A fresh classifier."""
        return ViTRegForImageClassification(model_config)

    @staticmethod
    def data_pipeline(config: TrainConfig, patch_size: int, images) -> tuple:
        """(per-image transform, collate, label column): 3-Augment, soft targets with MixUp / CutMix."""
        c = config
        transform = ThreeAugment(c.global_crop_size, c.crop_scale, c.color_jitter, c.three_augment)
        return transform, data.SupervisedCollate(c, len(data.class_names(images, c.label_column))), c.label_column

    @staticmethod
    def leaves_parameters_unused(config: TrainConfig) -> bool:
        """Every parameter of the classifier takes part in every step."""
        return False

    def forward(self, student: nn.Module, batch: dict, values: StepValues) -> tuple[torch.Tensor, dict]:
        """The loss of one batch."""
        logits = student(pixel_values=batch["pixel_values"]).logits.float()  # [B, C]
        targets = batch["targets"]  # [B, C], mixed
        if self.config.supervised_loss == "bce":
            # DeiT III binarises the mixed targets: every class in the mix is a full positive (engine.py,
            # `targets.gt(0.0)`); the config refuses label smoothing here, which would make every class positive.
            loss = F.binary_cross_entropy_with_logits(logits, targets.gt(0.0).to(targets.dtype))
        else:
            if self.config.label_smoothing:  # what timm's Mixup(label_smoothing=...) gives DeiT's soft-target CE
                smoothing = self.config.label_smoothing
                targets = targets * (1 - smoothing) + smoothing / targets.shape[1]
            loss = -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
        return loss, {"classification_loss": loss.detach()}

    def modules_to_clip(self, student: nn.Module) -> list[nn.Module]:
        """DeiT clips one norm over the whole model."""
        return [student]

    def update_teacher(self, student: nn.Module, momentum: float) -> None:
        """No teacher in supervised training."""

    def values_to_log(self, values: StepValues) -> dict[str, float]:
        """Nothing beyond lr and weight decay."""
        return {}

    def export_model(self, student: nn.Module) -> ViTRegForImageClassification:
        """The model to publish: the classifier itself."""
        return student


OBJECTIVES = {"dinov2": DINOv2Objective, "supervised": SupervisedObjective}
