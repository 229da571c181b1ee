"""Our DINOv2 recipe against FAIR's official code, the `dinov2` package (0.0.1.dev2, April 2023; the Makefile
installs it without its dependencies): losses, Sinkhorn-Knopp, centering, the head and its init, the schedules,
the parameter groups, the blur, and the whole loss as `train/ssl_meta_arch.py` composes it. Fixed inputs; every
value equal to 1e-6 relative."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import tiny_config
from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.layers.dino_head import DINOHead as OfficialDINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.utils.param_groups import get_params_groups_with_decay
from dinov2.utils.utils import CosineScheduler
from torch import nn
from torchvision import transforms as v1
from torchvision.transforms import v2

from vitreg.conversion.layouts import DINOV2_EXPORT_RULES, rename
from vitreg.modeling_vitreg import ViTRegModel
from vitreg.training import schedules
from vitreg.training.augment import MultiCrop
from vitreg.training.config import TrainConfig
from vitreg.training.heads import DINOHead
from vitreg.training.losses import TeacherTargets, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from vitreg.training.objectives import DINOv2Objective, DINOv2Student

B, K, D, HW = 4, 32, 16, 6  # images per crop, prototypes, backbone width, patches per global crop
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.05


def assert_close(ours, official, rel: float = 1e-6) -> None:
    """Equal to `rel`, relative to the largest magnitude among the official values."""
    ours, official = torch.as_tensor(ours).double(), torch.as_tensor(official).double()
    assert ours.shape == official.shape
    error = (ours - official).abs().max() / official.abs().max().clamp(min=1e-30)
    assert error.item() <= rel, f"relative error {error.item():.2e}"


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def scores(*shape, seed: int = 0) -> torch.Tensor:
    """Prototype scores as a head gives them: cosine similarities, in [-1, 1]."""
    return torch.tanh(randn(*shape, seed=seed))


def fixed_masks() -> torch.Tensor:
    """`[2B, HW]` iBOT masks: half the images masked, with different counts, the other half not at all."""
    counts = [2, 0, 3, 0, 1, 0, 4, 0]
    return torch.stack([torch.arange(HW) < count for count in counts])


@pytest.fixture
def process_group(tmp_path):
    """A single-process gloo group: the official iBOT Sinkhorn-Knopp all-reduces without asking."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def official_dino(student_global, student_local, teacher_targets_reversed, n_local: int) -> torch.Tensor:
    """DINOv2's DINO loss, as ssl_meta_arch.forward_backward composes it: local-crop term plus the global-crop term
    (doubled by `loss_scales`), each over `n_global_terms + n_local_terms`; teacher views in reversed order."""
    loss = DINOLoss(K, student_temp=STUDENT_TEMP)
    n_global_terms, n_local_terms = 2, max(2 * n_local, 1)
    total = 0.0
    if n_local:
        total = loss(student_local.chunk(n_local), teacher_targets_reversed) / (n_global_terms + n_local_terms)
    global_term = loss([student_global], [teacher_targets_reversed.flatten(0, 1)]) * 2
    return total + global_term / (n_global_terms + n_local_terms)


@pytest.mark.parametrize("n_local", [2, 0])
def test_dino_loss_matches_the_official_composition(n_local):
    student = randn((2 + n_local) * B, K, seed=1)  # global crop 1, global crop 2, local crops
    targets = F.softmax(randn(2 * B, K, seed=2) / TEACHER_TEMP, dim=-1).chunk(2)  # teacher crop 1, crop 2
    ours = dino_loss(list(student.chunk(2 + n_local)), list(targets), STUDENT_TEMP)
    reversed_targets = torch.stack([targets[1], targets[0]])  # [2, B, K]: crop 2 first, so crop 1 learns from it
    assert_close(ours, official_dino(student[: 2 * B], student[2 * B :], reversed_targets, n_local))


def test_ibot_loss_matches_forward_masked():
    masks = fixed_masks()
    m = int(masks.sum())
    student, targets = randn(m, K, seed=3), F.softmax(randn(m, K, seed=4) / TEACHER_TEMP, dim=-1)
    official = iBOTPatchLoss(K, student_temp=STUDENT_TEMP).forward_masked(
        student, targets, student_masks_flat=masks, n_masked_patches=m
    )
    loss_scales, ibot_loss_scale = 2, 1 / 2  # ssl_meta_arch's factors on the iBOT term
    assert_close(ibot_loss(student, targets, masks, STUDENT_TEMP), official * loss_scales * ibot_loss_scale)


@pytest.mark.filterwarnings("ignore:.*autocast.*:FutureWarning")
def test_koleo_loss_matches_the_official_one():
    features = randn(2 * B, D, seed=5)
    assert_close(koleo_loss(features), KoLeoLoss()(features))


def test_sinkhorn_knopp_matches_both_official_variants(process_group):
    for seed, rows in ((6, 2 * B), (7, 11)):
        logits = scores(rows, K, seed=seed)
        ours = sinkhorn_knopp(logits, TEACHER_TEMP, iterations=3)
        dino = DINOLoss(K).sinkhorn_knopp_teacher(logits, TEACHER_TEMP, n_iterations=3)
        ibot = iBOTPatchLoss(K).sinkhorn_knopp_teacher(
            logits, TEACHER_TEMP, n_masked_patches_tensor=torch.tensor([rows]), n_iterations=3
        )
        assert_close(ours, dino)
        assert_close(ours, ibot)


def test_dino_centering_matches_over_several_steps():
    official, ours = DINOLoss(K, center_momentum=0.9), TeacherTargets(K, "centering", center_momentum=0.9)
    for step in range(4):
        logits = scores(2 * B, K, seed=10 + step) + 0.2 * step  # a drifting mean, for the center to follow
        expected = official.softmax_center_teacher(logits, teacher_temp=TEACHER_TEMP)
        official.update_center(logits)
        assert_close(ours(logits, TEACHER_TEMP), expected)
    official.apply_center_update()  # the official update is applied lazily, at the next use
    assert_close(ours.center, official.center)


def test_ibot_centering_matches_over_several_steps():
    official = iBOTPatchLoss(K, center_momentum=0.9)
    ours = TeacherTargets(K, "centering", center_momentum=0.9, per_process_mean=True)
    for step, masked in enumerate((5, 3, 9, 1)):
        logits = scores(masked, K, seed=20 + step) - 0.2 * step
        # as ssl_meta_arch calls it: scores [1, M, K], the center update from each process's mean over its patches
        batched = logits.unsqueeze(0)
        expected = official.softmax_center_teacher(batched[:, :masked], teacher_temp=TEACHER_TEMP).squeeze(0)
        official.update_center(batched[:masked])
        assert_close(ours(logits, TEACHER_TEMP), expected)
    official.apply_center_update()
    assert_close(ours.center, official.center.reshape(1, K))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("n_layers", [2, 3])
def test_dino_head_matches_the_official_head_with_its_weights(n_layers):
    official = OfficialDINOHead(D, K, nlayers=n_layers, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        official.last_layer.weight_g.uniform_(0.5, 1.5)  # trained norms, not all 1
    ours = DINOHead(D, K, hidden_dim=24, bottleneck_dim=8, n_layers=n_layers)
    ours.load_state_dict(official.state_dict())
    x = randn(5, D, seed=30)
    assert_close(ours(x), official(x))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_prototype_init_has_the_official_distribution():
    official = OfficialDINOHead(64, 2048, hidden_dim=128, bottleneck_dim=256)
    ours = DINOHead(64, 2048, hidden_dim=128, bottleneck_dim=256)
    ratio = ours.last_layer.weight_v.std() / official.last_layer.weight_v.std()
    assert ratio.item() == pytest.approx(1.0, abs=0.02)  # trunc-normal(0.02) would give 0.55
    bound = 1 / 256**0.5  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.99 * bound < ours.last_layer.weight_v.abs().max().item() <= bound
    assert torch.equal(ours.last_layer.weight_g, official.last_layer.weight_g)  # all 1
    for index in (0, 2, 4):  # the MLP: trunc-normal 0.02, zero biases, in both
        ratio = ours.mlp[index].weight.std() / official.mlp[index].weight.std()
        assert ratio.item() == pytest.approx(1.0, abs=0.05)
        assert not ours.mlp[index].bias.any()


@pytest.mark.parametrize(
    "lengths",
    [
        dict(max_steps=60, warmup_steps=7, warmup_teacher_temp_steps=15, freeze_last_layer_steps=5),
        dict(max_steps=20, warmup_steps=0, warmup_teacher_temp_steps=1, freeze_last_layer_steps=0),
        dict(max_steps=12, warmup_steps=1, warmup_teacher_temp_steps=12, freeze_last_layer_steps=12),
    ],
)
def test_schedules_equal_the_official_cosine_schedulers_at_every_step(lengths):
    config = TrainConfig(min_lr=1e-6, weight_decay=0.04, weight_decay_end=0.4, **lengths)
    peak_lr, total = 2e-3, config.max_steps
    # as dinov2/train/train.py build_schedulers builds them, with epochs * OFFICIAL_EPOCH_LENGTH in steps
    lr = dict(base_value=peak_lr, final_value=config.min_lr, total_iters=total, warmup_iters=config.warmup_steps)
    official = {
        "lr": CosineScheduler(**lr),
        "weight_decay": CosineScheduler(config.weight_decay, config.weight_decay_end, total),
        "momentum": CosineScheduler(config.momentum_teacher, config.final_momentum_teacher, total),
        "teacher_temp": CosineScheduler(
            base_value=config.teacher_temp,
            final_value=config.teacher_temp,
            total_iters=config.warmup_teacher_temp_steps,
            warmup_iters=config.warmup_teacher_temp_steps,
            start_warmup_value=config.warmup_teacher_temp,
        ),
        "last_layer_lr": CosineScheduler(**lr),
    }
    official["last_layer_lr"].schedule[: config.freeze_last_layer_steps] = 0
    for step in range(total + 3):
        values = schedules.values_at(step, config, peak_lr)
        for name, schedule in official.items():
            assert getattr(values, name) == pytest.approx(schedule[step], rel=1e-9, abs=1e-15), (name, step)


class OfficialNames(nn.Module):
    """Parameters under their official DINOv2 names; `blocks` only tells the official code how many there are."""

    def __init__(self, named: dict[str, nn.Parameter], num_blocks: int):
        super().__init__()
        self.named, self.blocks = named, [None] * num_blocks

    def named_parameters(self, *args, **kwargs):
        return iter(self.named.items())


def test_param_groups_match_the_official_multipliers():
    config = TrainConfig(
        layerwise_decay=0.9,
        patch_embed_lr_mult=0.2,
        head_n_prototypes=K,
        head_hidden_dim=24,
        head_bottleneck_dim=8,
        ibot_separate_head=True,
    )
    student = DINOv2Student(ViTRegModel(tiny_config()), config)
    num_layers = student.backbone.config.num_hidden_layers
    ours = {id(p): g for g in schedules.param_groups(student, num_layers, config) for p in g["params"]}

    # as ssl_meta_arch.get_params_groups: one call per student module, the backbone under the official names
    backbone = OfficialNames(rename(dict(student.backbone.named_parameters()), DINOV2_EXPORT_RULES), num_layers)
    official = [
        group
        for module in (backbone, student.dino_head, student.ibot_head)
        for group in get_params_groups_with_decay(module, lr_decay_rate=0.9, patch_embed_lr_mult=0.2)
    ]
    assert len(official) == len(ours) == len(list(student.parameters()))
    for group in official:
        mine = ours[id(group["params"])]
        assert mine["wd_mult"] == group["wd_multiplier"] and mine["last_layer"] == group["is_last_layer"], group["name"]
        if group["name"] == "register_tokens":
            # The April-2023 package predates registers and leaves them undecayed (layer num_layers + 1); the
            # official code since then puts `.register_tokens` with the embeddings at layer 0, as we do.
            assert group["lr_multiplier"] == 1.0 and mine["lr_mult"] == pytest.approx(0.9 ** (num_layers + 1))
            continue
        assert mine["lr_mult"] == pytest.approx(group["lr_multiplier"], rel=1e-12), group["name"]


def blur_probabilities(transform) -> list[float]:
    """The `p` of every RandomApply around a Gaussian blur in a (nested) torchvision transform."""
    blurs = (v1.GaussianBlur, v2.GaussianBlur)
    if isinstance(transform, (v1.RandomApply, v2.RandomApply)) and isinstance(transform.transforms[0], blurs):
        return [transform.p]
    return [p for inner in getattr(transform, "transforms", []) for p in blur_probabilities(inner)]


def blur_operations(transform) -> list[tuple]:
    """(kernel size, sigma range) of every Gaussian blur in a (nested) torchvision transform."""
    if isinstance(transform, (v1.GaussianBlur, v2.GaussianBlur)):
        return [(tuple(transform.kernel_size), tuple(float(s) for s in transform.sigma))]
    return [op for inner in getattr(transform, "transforms", []) for op in blur_operations(inner)]


def test_blur_follows_the_official_code_or_the_paper():
    official = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=32, local_crops_size=16)
    crops = {
        convention: MultiCrop(32, (0.32, 1.0), 2, 16, (0.05, 0.32), convention)
        for convention in ("official_code", "paper")
    }
    for name in ("global_1", "global_2", "local"):
        official_transform = {"global_1": official.global_transfo1, "global_2": official.global_transfo2}.get(
            name, official.local_transfo
        )
        assert blur_probabilities(getattr(crops["official_code"], name)) == blur_probabilities(official_transform)
        assert blur_operations(getattr(crops["official_code"], name)) == blur_operations(official_transform)
    assert [blur_probabilities(getattr(crops["paper"], name)) for name in ("global_1", "global_2", "local")] == [
        [1.0],
        [0.1],
        [0.5],
    ]
    assert blur_probabilities(official.global_transfo1) == [0.0]  # the released checkpoints never blurred crop 1


def official_total(out: dict, teacher_cls, teacher_patches, masks, n_local: int, centering: str, losses) -> dict:
    """DINOv2's loss terms on fixed head outputs, written after ssl_meta_arch.forward_backward (shared head, both
    weights 1): teacher CLS chunked and re-concatenated in reverse, targets by centering or Sinkhorn-Knopp, the
    local- and global-crop DINO terms over `n_global_terms + n_local_terms` with `loss_scales = 2` on the global
    one, KoLeo weighted 0.1 over the two global crops, iBOT `forward_masked * loss_scales * ibot_loss_scale`."""
    dino, ibot, koleo = losses
    n_global_crops, n_masked = 2, int(masks.sum())
    n_local_terms, n_global_terms = max(n_local * n_global_crops, 1), (n_global_crops - 1) * n_global_crops
    loss_scales, ibot_loss_scale = 2, 1.0 / n_global_crops

    chunks = teacher_cls.chunk(n_global_crops)
    teacher_cls = torch.cat((chunks[1], chunks[0]))
    if centering == "centering":
        teacher_dino = dino.softmax_center_teacher(teacher_cls, teacher_temp=TEACHER_TEMP).view(2, -1, K)
        dino.update_center(teacher_cls)
        batched = teacher_patches.unsqueeze(0)
        teacher_ibot = ibot.softmax_center_teacher(batched[:, :n_masked], teacher_temp=TEACHER_TEMP).squeeze(0)
        ibot.update_center(batched[:n_masked])
    else:
        teacher_dino = dino.sinkhorn_knopp_teacher(teacher_cls, teacher_temp=TEACHER_TEMP).view(2, -1, K)
        teacher_ibot = ibot.sinkhorn_knopp_teacher(
            teacher_patches, teacher_temp=TEACHER_TEMP, n_masked_patches_tensor=torch.tensor([n_masked])
        )

    student_global, student_local = out["cls_logits"][: 2 * B], out["cls_logits"][2 * B :]
    terms = {"dino_loss": 0.0}
    if n_local > 0:
        terms["dino_loss"] = dino(student_local.chunk(n_local), teacher_dino) / (n_global_terms + n_local_terms)
    terms["dino_loss"] = terms["dino_loss"] + dino([student_global], [teacher_dino.flatten(0, 1)]) * loss_scales / (
        n_global_terms + n_local_terms
    )
    terms["koleo_loss"] = 0.1 * sum(koleo(p) for p in out["backbone_cls"].chunk(2))
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    terms["ibot_loss"] = (
        ibot.forward_masked(
            out["patch_logits"],
            teacher_ibot,
            student_masks_flat=masks,
            n_masked_patches=n_masked,
            masks_weight=masks_weight,
        )
        * loss_scales
        * ibot_loss_scale
    )
    return terms


@pytest.mark.filterwarnings("ignore:.*autocast.*:FutureWarning")
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("n_local", [2, 0])
def test_dinov2_objective_loss_equals_the_official_composition(process_group, n_local, centering):
    config = TrainConfig(
        head_n_prototypes=K,
        head_hidden_dim=24,
        head_bottleneck_dim=8,
        local_crops_number=n_local,
        centering=centering,
        student_temp=STUDENT_TEMP,
        koleo_loss_weight=0.1,
    )
    objective = DINOv2Objective(DINOv2Student(ViTRegModel(tiny_config()), config), config)
    losses = (DINOLoss(K, student_temp=STUDENT_TEMP), iBOTPatchLoss(K, student_temp=STUDENT_TEMP), KoLeoLoss())
    masks = fixed_masks()
    m = int(masks.sum())
    for step in range(3):  # the centers carry over from step to step
        seed = 100 * step
        out = {
            "cls_logits": randn((2 + n_local) * B, K, seed=seed + 1),
            "backbone_cls": randn(2 * B, D, seed=seed + 2),
            "patch_logits": randn(m, K, seed=seed + 3),
        }
        teacher_cls = scores(2 * B, K, seed=seed + 4) + 0.2 * step
        teacher_patches = scores(m, K, seed=seed + 5) - 0.2 * step
        loss, parts = objective.loss(out, teacher_cls, teacher_patches, masks, TEACHER_TEMP)
        expected = official_total(out, teacher_cls, teacher_patches, masks, n_local, centering, losses)
        assert_close(loss, sum(expected.values()))
        assert_close(parts["dino_loss"], expected["dino_loss"])
        assert_close(parts["ibot_loss"], expected["ibot_loss"])
        assert_close(0.1 * parts["koleo_loss"], expected["koleo_loss"])
