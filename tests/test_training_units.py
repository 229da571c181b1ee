"""Unit tests of the pretraining pieces: losses against hand-computed values, Sinkhorn-Knopp, masking, schedules,
parameter groups, per-module clipping and the last-layer freeze, the resumable sampler and the config checks.
(tests/test_official_dinov2.py checks the same pieces against FAIR's code.)"""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from torch import nn

from vitreg.core.errors import UserError
from vitreg.training import schedules
from vitreg.training.config import TrainConfig, load_config
from vitreg.training.data import ShardedEndlessBatches
from vitreg.training.flops import train_step_flops, vit_forward_flops
from vitreg.training.heads import DINOHead
from vitreg.training.losses import TeacherTargets, dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp
from vitreg.training.masking import block_mask, sample_masks


def test_dino_loss_matches_hand_computation():
    # Two prototypes, batch of one. Student logits [0, ln 3] at temp 1 -> softmax [1/4, 3/4].
    s = torch.tensor([[0.0, math.log(3.0)]])
    t0, t1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    local = torch.tensor([[0.0, 0.0]])  # softmax [1/2, 1/2]
    # Pairs (teacher 0 -> student 1, local), (teacher 1 -> student 0, local); the same view never pairs with itself.
    loss = dino_loss([torch.tensor([[5.0, -5.0]]), s, local], [t0, t1], student_temp=1.0)
    p0 = F.softmax(torch.tensor([5.0, -5.0]), dim=0)
    expected = (-math.log(1 / 4) - math.log(1 / 2) - (0.5 * p0.log()).sum().item() - math.log(1 / 2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_temperature_scales_student_logits():
    s = torch.tensor([[0.0, 0.1 * math.log(3.0)]])  # at temp 0.1 this is softmax [1/4, 3/4]
    target = torch.tensor([[0.0, 1.0]])
    loss = dino_loss([torch.zeros(1, 2), s], [target, torch.zeros(1, 2)], student_temp=0.1)
    # the second pair has a zero target; without local crops DINOv2 divides the 2 pairs by 2 + max(0, 1) = 3
    assert loss.item() == pytest.approx(-math.log(3 / 4) / 3, rel=1e-6)


def test_ibot_loss_averages_within_image_then_over_all_images():
    masks = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    student = torch.zeros(3, 2)  # uniform: every masked patch costs ln 2 against a one-hot target
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # images 0 and 2 cost ln 2 each; DINOv2 divides by all 3 images, the unmasked one included
    assert ibot_loss(student, targets, masks, 1.0).item() == pytest.approx(2 * math.log(2) / 3, rel=1e-6)
    # A confident, correct student on image 0's patches: image 0 costs ~0, image 2 still ln 2
    student = torch.tensor([[50.0, 0.0], [0.0, 50.0], [0.0, 0.0]])
    assert ibot_loss(student, targets, masks, 1.0).item() == pytest.approx(math.log(2) / 3, rel=1e-5)


def test_koleo_loss_is_minus_mean_log_nearest_neighbour_distance():
    # Unit vectors at 0, 90 and 180 degrees: nearest distances sqrt(2), sqrt(2), sqrt(2).
    x = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-5)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])  # a near-duplicate pair makes the loss large
    assert koleo_loss(y).item() > 2.0


def test_sinkhorn_knopp_balances_prototypes_and_normalises_rows():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 3 + torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0])  # prototype 0 dominates
    q = sinkhorn_knopp(logits, temperature=1.0, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((8,), 64 / 8), atol=1e-2)
    three = sinkhorn_knopp(logits, temperature=1.0, iterations=3)
    softmax_share = F.softmax(logits, dim=1)[:, 0].mean()
    assert three[:, 0].mean() < softmax_share  # 3 iterations already move mass away from the dominant prototype


def test_centering_subtracts_center_and_updates_it_as_ema():
    targets = TeacherTargets(2, "centering", center_momentum=0.9)
    logits = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    out = targets(logits, temperature=0.5)
    assert torch.allclose(out, F.softmax(logits / 0.5, dim=1))  # the center starts at zero
    assert torch.allclose(targets.center, torch.tensor([[0.2, 0.0]]))  # 0.1 * batch mean [2, 0]
    out = targets(logits, temperature=0.5)
    assert torch.allclose(out, F.softmax((logits - torch.tensor([0.2, 0.0])) / 0.5, dim=1))
    assert torch.allclose(targets.center, torch.tensor([[0.38, 0.0]]))


def test_ibot_center_averages_the_per_process_means(monkeypatch):
    """Two processes simulated by the all-reduce: this one masked 1 patch, the other 3 (mean [1, 0])."""
    from vitreg.training import losses

    def two_processes(*others):
        pending = iter(others)  # the other process's (sum, count), in the order update_center all-reduces them

        def all_reduce_sum(tensor):
            return tensor.add_(next(pending))

        monkeypatch.setattr(losses, "all_reduce_sum", all_reduce_sum)

    other_mean = torch.tensor([[1.0, 0.0]])
    two_processes(other_mean, torch.tensor(1.0))
    targets = TeacherTargets(2, "centering", center_momentum=0.9, per_process_mean=True)
    targets.update_center(torch.tensor([[3.0, 2.0]]))
    assert torch.allclose(targets.center, 0.1 * torch.tensor([[2.0, 1.0]]))  # mean of the means, not of the 4 rows
    # this process masked nothing: it adds nothing and is not counted (the official code would average to NaN)
    two_processes(other_mean, torch.tensor(1.0))
    targets = TeacherTargets(2, "centering", center_momentum=0.9, per_process_mean=True)
    targets.update_center(torch.zeros(0, 2))
    assert torch.allclose(targets.center, 0.1 * other_mean)
    # no process masked anything: the center stays
    two_processes(torch.zeros(1, 2), torch.tensor(0.0))
    targets.update_center(torch.zeros(0, 2))
    assert torch.allclose(targets.center, 0.1 * other_mean)


def test_block_mask_masks_rectangles_near_the_target_count():
    rng = random.Random(0)
    for target in (4, 8, 16, 30):
        mask = block_mask(8, 8, target, rng, min_patches=4)
        assert mask.dtype == torch.bool and mask.shape == (8, 8)
        assert 0 < int(mask.sum()) <= target
    assert int(block_mask(8, 8, 0, rng).sum()) == 0


def test_sample_masks_masks_half_the_images_with_spread_ratios():
    masks = sample_masks(16, 8, 8, probability=0.5, ratio_min_max=(0.1, 0.5), rng=random.Random(1), min_patches=4)
    per_image = masks.sum(dim=1)
    assert masks.shape == (16, 64)
    assert int((per_image > 0).sum()) == 8
    assert per_image.max() <= 0.5 * 64 and per_image[per_image > 0].min() >= 1
    assert len(set(per_image[per_image > 0].tolist())) > 3  # ratios are spread, not one value
    again = sample_masks(16, 8, 8, 0.5, (0.1, 0.5), random.Random(1), 4)
    assert torch.equal(masks, again)


def test_cosine_schedule_warmup_and_ends():
    # DINOv2's CosineScheduler: warmup = np.linspace(start, base, warmup), so base is reached at step warmup - 1
    assert schedules.cosine(0, 1.0, 0.0, 100, warmup=11) == 0.0
    assert schedules.cosine(5, 1.0, 0.0, 100, warmup=11) == pytest.approx(0.5)
    assert schedules.cosine(10, 1.0, 0.0, 100, warmup=11) == pytest.approx(1.0)
    assert schedules.cosine(11, 1.0, 0.0, 100, warmup=11) == pytest.approx(1.0)  # the cosine starts at base
    assert schedules.cosine(55, 1.0, 0.0, 100, warmup=10) == pytest.approx(0.5)
    assert schedules.cosine(99, 1.0, 0.1, 100) > 0.1 and schedules.cosine(100, 1.0, 0.1, 100) == 0.1
    assert schedules.cosine(15, 0.07, 0.07, 31, 31, warmup_start=0.04) == pytest.approx(0.055)  # teacher temp
    assert schedules.cosine(300, 0.07, 0.07, 31, 31, warmup_start=0.04) == 0.07


def test_values_at_follows_the_dinov2_recipe():
    config = TrainConfig(max_steps=100, warmup_steps=10, freeze_last_layer_steps=3, warmup_teacher_temp_steps=20)
    first, last = schedules.values_at(0, config, 1e-3), schedules.values_at(100, config, 1e-3)
    assert first.lr == 0 and first.teacher_temp == pytest.approx(0.04)
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(0.4)
    assert first.momentum == pytest.approx(0.992) and last.momentum == pytest.approx(1.0)
    assert last.lr == pytest.approx(1e-6) and last.last_layer_lr == last.lr
    frozen, thawed = schedules.values_at(2, config, 1e-3), schedules.values_at(3, config, 1e-3)
    assert frozen.lr > 0 and frozen.last_layer_lr == 0 and thawed.last_layer_lr == thawed.lr > 0
    assert TrainConfig(batch_size_per_device=64).peak_lr(4) == pytest.approx(0.004 * math.sqrt(256 / 1024))


def test_param_groups_layerwise_decay_patch_embed_and_no_weight_decay():
    from vitreg.modeling_vitreg import ViTRegModel
    from vitreg.training.objectives import DINOv2Objective, DINOv2Student

    config = TrainConfig(
        layerwise_decay=0.5, patch_embed_lr_mult=0.2, head_n_prototypes=16, head_hidden_dim=8, head_bottleneck_dim=4
    )
    student = DINOv2Student(ViTRegModel(tiny_config(**DINOv2Objective.model_config_kwargs(config, None))), config)
    groups = schedules.param_groups(student, 2, config)
    lookup = {id(p): g for g in groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert lookup[id(named["backbone.embeddings.cls_token"])]["lr_mult"] == pytest.approx(0.5**3)
    assert lookup[id(named["backbone.embeddings.patch_embeddings.projection.weight"])]["lr_mult"] == pytest.approx(
        0.5**3 * 0.2
    )
    assert lookup[id(named["backbone.encoder.layer.1.mlp.fc1.weight"])]["lr_mult"] == pytest.approx(0.5)
    assert lookup[id(named["dino_head.mlp.0.weight"])]["lr_mult"] == 1.0
    assert lookup[id(named["backbone.encoder.layer.0.norm1.weight"])]["wd_mult"] == 0.0
    assert lookup[id(named["backbone.encoder.layer.0.layer_scale1.lambda1"])]["wd_mult"] == 0.0
    assert lookup[id(named["backbone.encoder.layer.0.attention.qkv.bias"])]["wd_mult"] == 0.0
    assert lookup[id(named["backbone.encoder.layer.0.attention.qkv.weight"])]["wd_mult"] == 1.0
    assert lookup[id(named["dino_head.last_layer.weight_v"])]["last_layer"]


def test_train_step_clips_each_module_on_its_own_and_freezes_the_last_layer_by_its_lr():
    """On fixed gradients: backbone, DINO head and iBOT head are each clipped to clip_grad (DINOv2 clips
    `model.student.values()` one by one); the frozen prototypes keep their weights (lr 0, hence no weight decay
    either) while their gradient still reaches Adam's moments. Adam's first moment after one step is
    (1 - beta1) * the clipped gradient, which shows what the clipping did."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vitreg.modeling_vitreg import ViTRegModel
    from vitreg.training.objectives import DINOv2Objective, DINOv2Student
    from vitreg.training.step import build_optimizer, train_step

    config = TrainConfig(head_n_prototypes=16, head_hidden_dim=8, head_bottleneck_dim=4, ibot_separate_head=True)
    student = DINOv2Student(ViTRegModel(tiny_config()), config)
    dinov2 = DINOv2Objective(student, config)
    generator = torch.Generator().manual_seed(0)
    scale = {"backbone": 1.0, "dino_head": 0.5, "ibot_head": 0.01}  # norms ~ 40, ~ 3 and ~ 0.06 against clip 1
    gradients = {
        name: torch.randn(p.shape, generator=generator) * scale[name.split(".")[0]]
        for name, p in student.named_parameters()
    }
    assert dinov2.modules_to_clip(student) == [student.backbone, student.dino_head, student.ibot_head]
    modules = ("backbone", "dino_head", "ibot_head")
    raw_norms = {
        key: torch.linalg.vector_norm(torch.cat([gradients[n].flatten() for n in gradients if n.startswith(key)]))
        for key in modules
    }
    assert raw_norms["backbone"] > 10 and raw_norms["dino_head"] > 1 > raw_norms["ibot_head"]

    class FixedGradients(nn.Module):
        """A loss whose gradient is `gradients`, clipped as DINOv2 clips."""

        def forward(self, student, batch, values):
            return sum((p * gradients[n]).sum() for n, p in student.named_parameters()), {}

        modules_to_clip = staticmethod(dinov2.modules_to_clip)

        def update_teacher(self, student, momentum):
            pass

    optimizer = build_optimizer(student, 2, config)
    last_layer = [student.dino_head.last_layer.weight_v, student.dino_head.last_layer.weight_g]
    before = [p.detach().clone() for p in last_layer]
    mlp_before = student.dino_head.mlp[0].weight.detach().clone()
    values = schedules.StepValues(lr=1e-2, last_layer_lr=0.0, weight_decay=0.04, momentum=0.9, teacher_temp=0.04)
    accelerator = Accelerator(cpu=True)
    try:
        train_step(accelerator, student, FixedGradients(), optimizer, {}, values, clip_grad=1.0)
        clipped = {n: optimizer.state[p]["exp_avg"] / (1 - config.adam_beta1) for n, p in student.named_parameters()}
        for key in modules:
            norm = torch.linalg.vector_norm(torch.cat([clipped[n].flatten() for n in clipped if n.startswith(key)]))
            assert norm.item() == pytest.approx(min(raw_norms[key].item(), 1.0), rel=1e-5), key
        assert torch.allclose(clipped["ibot_head.mlp.0.weight"], gradients["ibot_head.mlp.0.weight"])  # untouched
        for param, old in zip(last_layer, before):
            assert torch.equal(param, old)  # frozen: neither the update nor the weight decay moved it
            assert optimizer.state[param]["exp_avg"].abs().sum() > 0  # ... but Adam saw its gradient
        assert not torch.equal(student.dino_head.mlp[0].weight, mlp_before)  # the rest of the head learns
        values.last_layer_lr = values.lr
        train_step(accelerator, student, FixedGradients(), optimizer, {}, values, clip_grad=1.0)
        assert not torch.equal(last_layer[0], before[0])  # thawed
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_dinov2_student_sees_masked_global_crops_even_without_ibot():
    """As in DINOv2's ssl_meta_arch, which masks the student's global crops whatever the iBOT weight."""
    from vitreg.modeling_vitreg import ViTRegModel
    from vitreg.training.objectives import DINOv2Objective, DINOv2Student

    config = TrainConfig(
        head_n_prototypes=16, head_hidden_dim=8, head_bottleneck_dim=4, local_crops_number=0, ibot_loss_weight=0.0
    )
    student = DINOv2Student(ViTRegModel(tiny_config(**DINOv2Objective.model_config_kwargs(config, None))), config)
    objective = DINOv2Objective(student, config)
    seen = []
    student.backbone.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    masks = torch.tensor([[True, False, False, False], [False] * 4, [False, True, True, False], [False] * 4])
    batch = {"global_crops": torch.randn(4, 3, 28, 28), "local_crops": torch.zeros(0, 3, 1, 1), "masks": masks}
    _, parts = objective(student, batch, schedules.values_at(0, config, 1e-3))
    assert torch.equal(seen[0]["bool_masked_pos"], masks) and set(parts) == {"dino_loss", "koleo_loss"}


def test_supervised_bce_binarises_mixed_targets_as_deit3():
    from types import SimpleNamespace

    from vitreg.training.objectives import SupervisedObjective

    class Logits(nn.Module):
        def forward(self, pixel_values):
            return SimpleNamespace(logits=pixel_values)

    logits = torch.tensor([[2.0, -1.0, 0.5]])
    batch = {"pixel_values": logits, "targets": torch.tensor([[0.7, 0.3, 0.0]])}  # a MixUp of classes 0 and 1
    bce = SupervisedObjective(None, TrainConfig(objective="supervised", supervised_loss="bce"))
    loss, _ = bce(Logits(), batch, None)
    assert loss.item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, torch.tensor([[1.0, 1, 0]])).item())
    ce = SupervisedObjective(None, TrainConfig(objective="supervised", supervised_loss="ce", label_smoothing=0.3))
    loss, _ = ce(Logits(), batch, None)
    smoothed = torch.tensor([[0.7 * 0.7 + 0.1, 0.3 * 0.7 + 0.1, 0.1]])  # timm Mixup(label_smoothing=0.3), 3 classes
    assert loss.item() == pytest.approx(-(smoothed * F.log_softmax(logits, dim=-1)).sum().item(), rel=1e-6)


def test_dino_head_shapes_and_unit_prototypes():
    head = DINOHead(32, 64, hidden_dim=16, bottleneck_dim=8)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 64)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck . unit prototypes (g = 1): cosine similarities


def test_sampler_shards_ranks_and_resumes_at_any_step():
    full = ShardedEndlessBatches(10, 3, rank=0, world_size=1, seed=7)
    stream = [b for _, b in zip(range(8), full)]
    ranks = [ShardedEndlessBatches(10, 3, rank=r, world_size=2, seed=7) for r in range(2)]
    shards = [[b for _, b in zip(range(4), sampler)] for sampler in ranks]
    flat = [item for batch in stream for item in batch]
    # global step s = the single-process stream's 6 samples dealt alternately to rank 0 and rank 1
    for step in range(4):
        dealt = [sample for pair in zip(shards[0][step], shards[1][step]) for sample in pair]
        assert dealt == flat[6 * step : 6 * step + 6]
    resumed = ShardedEndlessBatches(10, 3, rank=1, world_size=2, seed=7, start_step=2)
    assert next(iter(resumed)) == shards[1][2]
    epoch = [index for index, _ in flat[:10]]
    assert sorted(epoch) == list(range(10))  # each epoch is a permutation


def test_flops_grow_with_tokens():
    model = tiny_config(patch_size=8, image_size=32)
    assert vit_forward_flops(model, 64) > 3.5 * vit_forward_flops(model, 32)
    config = TrainConfig(batch_size_per_device=2, global_crop_size=32, local_crop_size=16, model={"patch_size": 8})
    assert train_step_flops(config, model) > 3 * 2 * 2 * vit_forward_flops(model, 32)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bogus": 1}, "unknown config key"),
        ({"base_lr": -0.1}, "base_lr must be positive"),
        ({"local_crop_size": 64, "global_crop_size": 32}, "bigger than global_crop_size"),
        ({"global_crop_size": 30}, "not a multiple of the patch size"),
        ({"objective": "mae"}, "objective must be one of"),
        ({"mask_ratio_min_max": [0.6, 0.2]}, "mask_ratio_min_max"),
        ({"max_steps": "ten"}, "wrong type"),
        ({"data_dir": "a", "dataset": "b"}, "not both"),
        ({"objective": "supervised", "supervised_loss": "bce", "label_smoothing": 0.1}, "binarises"),
    ],
)
def test_bad_config_values_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config("smoke-dinov2", overrides)


def test_shipped_configs_load():
    from vitreg.training.config import CONFIG_DIR

    names = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
    assert {"smoke-dinov2", "smoke-supervised"} <= set(names) and len(names) >= 5
    for name in names:
        load_config(name)


def test_deit3_exempts_tokens_and_positions_from_weight_decay_dinov2_does_not():
    """DeiT III's optimizer (timm's factory) skips pos_embed and cls_token (`no_weight_decay()`) and 1-D parameters;
    DINOv2 decays everything but biases, norms and LayerScale."""
    from vitreg.modeling_vitreg import ViTRegForImageClassification
    from vitreg.training.step import build_optimizer

    tokens = ("position_embeddings", "cls_token", "register_tokens")
    for objective, decayed in (("supervised", 0.0), ("dinov2", 1.0)):
        config = TrainConfig(objective=objective, supervised_loss="ce")
        model = ViTRegForImageClassification(tiny_config(num_labels=3))
        optimizer = build_optimizer(model, 2, config)
        wd = {id(p): group["wd_mult"] for group in optimizer.param_groups for p in group["params"]}
        for name, param in model.named_parameters():
            if name.endswith(tokens):
                assert wd[id(param)] == decayed, (objective, name)
            elif name.endswith("attention.qkv.weight"):
                assert wd[id(param)] == 1.0, (objective, name)
