"""Every shipped recipe follows one upstream recipe, named by its `upstream` key and its header comment. This test maps
the upstream keys onto ours and lists, key by key, each deliberate deviation with its reason: any other difference
fails, an allowed deviation that no longer is one fails, and so does an upstream key or a key of the recipe that is
neither compared nor set aside with a reason.

Upstream values: dinov2/configs/ssl_default_config.yaml from the installed `dinov2` package (0.0.1.dev2, which the
Makefile installs); dinov2/configs/train/vitl14.yaml and the DeiT III README's ViT-B ImageNet-1k command are not in
any package, so they are snapshots below, taken from the mirrors at the commits recorded with them (CI has no network).
Values that DINOv2's and DeiT's code fixes rather than their configs are listed with the file that fixes them.
The smoke configs (`upstream: null`) are test fixtures, not recipes: they are exempt.
"""

import importlib.metadata
import math
import shlex
from pathlib import Path

import pytest
import yaml

from vitreg.modeling_vitreg import ViTRegConfig
from vitreg.training.config import CONFIG_DIR, load_config, model_config_kwargs

# --- upstream sources ----------------------------------------------------------------------------------------------

DINOV2_COMMIT = "b8931f7bf91576930313be2c6d6af376033b35f0"  # facebookresearch/dinov2
DEIT_COMMIT = "7e160fe43f0252d17191b71cbb5826254114ea5b"  # facebookresearch/deit

# dinov2/configs/train/vitl14.yaml at DINOV2_COMMIT, verbatim
VITL14_YAML = """\
dino:
  head_n_prototypes: 131072
  head_bottleneck_dim: 384
ibot:
  separate_head: true
  head_n_prototypes: 131072
train:
  batch_size_per_gpu: 32
  dataset_path: ImageNet22k
  centering: sinkhorn_knopp
student:
  arch: vit_large
  patch_size: 14
  drop_path_rate: 0.4
  ffn_layer: swiglufused
  block_chunks: 4
teacher:
  momentum_teacher: 0.994
optim:
  epochs: 500
  weight_decay_end: 0.2
  base_lr: 2.0e-04  # learning rate for a batch size of 1024
  warmup_epochs: 80
  layerwise_decay: 1.0
crops:
  local_crops_size: 98
"""

# README_revenge.md at DEIT_COMMIT, "Training on ImageNet-1k", ViT-B (line 412), verbatim
DEIT3_VITB_COMMAND = (
    "python run_with_submitit.py --model deit_base_patch16_LS --data-path /path/to/imagenet --batch 256 --lr 3e-3 "
    "--epochs 800 --weight-decay 0.05 --sched cosine --input-size 192 --eval-crop-ratio 1.0 --reprob 0.0 --nodes 1 "
    "--ngpus 8 --smoothing 0.0 --warmup-epochs 5 --drop 0.0 --nb-classes 1000 --seed 0 --opt fusedlamb "
    "--warmup-lr 1e-6 --mixup .8 --drop-path 0.2 --cutmix 1.0 --unscale-lr --repeated-aug --bce-loss  "
    "--color-jitter 0.3 --ThreeAugment"
)

# DINOv2 code, not config: dinov2/models/vision_transformer.py (vit_* sizes, mlp_ratio 4, LayerNorm eps 1e-6, and the
# register arguments, which 0.0.1.dev2's config predates), dinov2/loss/dino_clstoken_loss.py (student_temp 0.1,
# center_momentum 0.9, 3 Sinkhorn-Knopp iterations), dinov2/data/masking.py (min_num_patches 4),
# dinov2/data/augmentations.py (GaussianBlur hands RandomApply 1 - p: the `official_code` blur convention).
DINOV2_ARCHS = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}
DINOV2_CODE = {
    "objective": "dinov2",
    "model.mlp_ratio": 4,
    "model.layer_norm_eps": 1e-6,
    "student_temp": 0.1,
    "center_momentum": 0.9,
    "sinkhorn_iterations": 3,
    "mask_min_patches": 4,
    "blur_convention": "official_code",
    "optimizer": "adamw",
}
DINOV2_REGISTER_DEFAULTS = {"num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1}

# DeiT code, not the command: main.py's defaults for what the command leaves out (--min-lr 1e-5, --clip-grad None,
# --num_workers 10, --opt-betas None: timm's Lamb (0.9, 0.999)), RASampler's num_repeats=3 (samplers.py), the
# 3-Augment crop scale (0.08, 1) (augment.py), engine.py's fp16 autocast, models_v2.deit_base_patch16_LS
# (ViT-B/16, qkv_bias, LayerScale init 1e-4, the same drop path in every block, the CLS token classifies).
IMAGENET_1K_TRAIN = 1_281_167
DEIT_CODE = {
    "objective": "supervised",
    "min_lr": 1e-5,
    "clip_grad": 0.0,
    "num_workers": 10,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "crop_scale": [0.08, 1.0],
    "mixed_precision": "fp16",
    "layerwise_decay": 1.0,
    "patch_embed_lr_mult": 1.0,
    "model.hidden_size": 768,
    "model.num_hidden_layers": 12,
    "model.num_attention_heads": 12,
    "model.patch_size": 16,
    "model.mlp_ratio": 4,
    "model.layer_norm_eps": 1e-6,
    "model.qkv_bias": True,
    "model.layerscale_value": 1e-4,
    "model.drop_path_uniform": True,
    "model.classifier_pooling": "cls",
    "model.num_register_tokens": 0,
}

# What our code fixes, as pseudo-keys the upstream values are compared with.
OURS_FIXED = {
    "optimizer": "adamw",
    "lr_schedule": "cosine",
    "warmup_start_lr": 0.0,
    "random_erasing": 0.0,
    "dropout": 0.0,
}

# --- deliberate deviations: key -> (upstream value, our value, reason) ----------------------------------------------

REGISTERS = "the point of the recipe: 4 registers, the paper's default"
ANTIALIAS = "the registers paper trains with antialiased position interpolation (else the local crops show stripes)"
BF16 = "bf16 autocast: fp16's range needs a loss scaler and the upstream runs used V100s/A100s without bf16 support"
DEVIATIONS = {
    "vits14-reg4-dinov2-imagenet": {
        "model.hidden_size": (1024, 384, "a ViT-S: DINOv2 has no ViT-S training config (its ViT-S/14 is distilled)"),
        "model.num_hidden_layers": (24, 12, "a ViT-S (see model.hidden_size)"),
        "model.num_attention_heads": (16, 6, "a ViT-S (see model.hidden_size)"),
        "model.patch_size": (16, 14, "patch 14, as DINOv2's released models and its train/*14.yaml configs"),
        "local_crop_size": (96, 98, "a multiple of the patch size 14, as in DINOv2's train/vitl14.yaml"),
        "model.num_register_tokens": (0, 4, REGISTERS),
        "model.interpolate_antialias": (False, True, ANTIALIAS),
        "model.interpolate_offset": (0.1, 0.0, ANTIALIAS),
        "mixed_precision": ("fp16", "bf16", BF16),
    },
    "vitl14-reg4-dinov2-imagenet": {
        "model.num_register_tokens": (0, 4, REGISTERS),
        "model.interpolate_antialias": (False, True, ANTIALIAS),
        "model.interpolate_offset": (0.1, 0.0, ANTIALIAS),
        "mixed_precision": ("fp16", "bf16", BF16),
        "ibot_head_bottleneck_dim": (
            256,
            384,
            "one head_bottleneck_dim for both heads; vitl14.yaml raises only the DINO head's to 384",
        ),
    },
    "deit3-vitb16-reg4-supervised-imagenet": {
        "model.num_register_tokens": (0, 4, REGISTERS),
        "mixed_precision": ("fp16", "bf16", BF16),
        "optimizer": ("fusedlamb", "adamw", "torch has no LAMB: AdamW (DeiT's optimizer) at DeiT III's lr and decay"),
        "warmup_start_lr": (1e-6, 0.0, "the lr warmup starts at 0, as DINOv2's scheduler that both objectives share"),
    },
}

# Upstream keys that are not training hyper-parameters of ours, with the reason ("x.*": every key under x).
DINOV2_SET_ASIDE = {
    "MODEL.WEIGHTS": "no pretrained initialisation",
    "compute_precision.*": "sharding and reduce/buffer dtypes are the accelerate config's (configs/accelerate/)",
    "train.dataset_path": "the data is a flag: --data_dir / --dataset",
    "train.output_dir": "the run folder is a flag: --output_dir",
    "train.saveckp_freq": "checkpoint cadence (checkpointing_steps); DINOv2's train.py saves every 3 epochs anyway",
    "train.cache_dataset": "datasets caches the image folder itself",
    "train.OFFICIAL_EPOCH_LENGTH": "turns epochs into steps (1250 steps an epoch)",
    "student.pretrained_weights": "no pretrained initialisation",
    "student.block_chunks": "FSDP wrapping granularity: configs/accelerate/fsdp.yaml wraps every block",
    "optim.lr": "computed from base_lr and the scaling rule (0 in the file)",
    "evaluation.eval_period_iterations": "no evaluation during pretraining",
}
DEIT_SET_ASIDE = {
    "data-path": "the data is a flag: --data_dir",
    "eval-crop-ratio": "evaluation only",
    "nb-classes": "from the class subfolders of the data",
    "nodes": "the process count is the launcher's: configs/accelerate/ddp.yaml runs 8, so 256 x 8 = DeiT's 2048",
    "ngpus": "see nodes",
    "model": "its architecture is compared key by key (models_v2.deit_base_patch16_LS above)",
}
# Keys of our recipes without an upstream counterpart.
OURS_ONLY = {
    "upstream": "names the upstream recipe",
    "logging_steps": "bookkeeping, no effect on the weights",
    "checkpointing_steps": "bookkeeping, no effect on the weights",
    "checkpoints_total_limit": "bookkeeping, no effect on the weights",
    "peak_tflops": "the MFU column only",
    "gradient_checkpointing": "memory for compute, the same step",
}
OURS_ONLY_DEIT = {
    "model.interpolate_antialias": "position interpolation at other resolutions: DeiT III trains at one size",
    "model.interpolate_offset": "position interpolation at other resolutions: DeiT III trains at one size",
}

# --- the mappings ---------------------------------------------------------------------------------------------------


def get(tree: dict, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def leaves(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of a nested mapping's values."""
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += leaves(value, f"{path}.") if isinstance(value, dict) else [path]
    return paths


def merge(base: dict, override: dict) -> dict:
    """OmegaConf.merge of two plain mappings: an upstream train config over the defaults."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def ssl_default_config() -> dict:
    """The defaults DINOv2's training starts from, read from the installed package (not imported: its configs
    module needs omegaconf)."""
    path = importlib.metadata.distribution("dinov2").locate_file("dinov2/configs/ssl_default_config.yaml")
    return yaml.safe_load(Path(path).read_text())


def dinov2_values(cfg: dict) -> tuple[dict, set[str]]:
    """Our keys -> upstream values of a DINOv2 config, and the upstream paths read."""
    read: set[str] = set()

    def up(path: str):
        read.add(path)
        return get(cfg, path)

    epoch = up("train.OFFICIAL_EPOCH_LENGTH")
    width, depth, heads = DINOV2_ARCHS[up("student.arch")]
    student = cfg["student"]
    values = {
        "model.hidden_size": width,
        "model.num_hidden_layers": depth,
        "model.num_attention_heads": heads,
        "model.patch_size": up("student.patch_size"),
        "model.drop_path_rate": up("student.drop_path_rate"),
        "model.layerscale_value": up("student.layerscale"),
        "model.drop_path_uniform": up("student.drop_path_uniform"),
        "model.use_swiglu_ffn": up("student.ffn_layer").startswith("swiglu"),
        "model.qkv_bias": up("student.qkv_bias"),
        "model.proj_bias": up("student.proj_bias"),
        "model.ffn_bias": up("student.ffn_bias"),
        **{f"model.{k}": student.get(k, default) for k, default in DINOV2_REGISTER_DEFAULTS.items()},
        "batch_size_per_device": up("train.batch_size_per_gpu"),
        "num_workers": up("train.num_workers"),
        "seed": up("train.seed"),
        "centering": up("train.centering"),
        "dino_loss_weight": up("dino.loss_weight"),
        "head_n_prototypes": up("dino.head_n_prototypes"),
        "head_bottleneck_dim": up("dino.head_bottleneck_dim"),
        "head_n_layers": up("dino.head_nlayers"),
        "head_hidden_dim": up("dino.head_hidden_dim"),
        "koleo_loss_weight": up("dino.koleo_loss_weight"),
        "ibot_loss_weight": up("ibot.loss_weight"),
        "mask_sample_probability": up("ibot.mask_sample_probability"),
        "mask_ratio_min_max": up("ibot.mask_ratio_min_max"),
        "ibot_separate_head": up("ibot.separate_head"),
        "ibot_head_n_prototypes": up("ibot.head_n_prototypes"),
        "ibot_head_bottleneck_dim": up("ibot.head_bottleneck_dim"),
        "ibot_head_n_layers": up("ibot.head_nlayers"),
        "ibot_head_hidden_dim": up("ibot.head_hidden_dim"),
        "momentum_teacher": up("teacher.momentum_teacher"),
        "final_momentum_teacher": up("teacher.final_momentum_teacher"),
        "warmup_teacher_temp": up("teacher.warmup_teacher_temp"),
        "teacher_temp": up("teacher.teacher_temp"),
        "warmup_teacher_temp_steps": up("teacher.warmup_teacher_temp_epochs") * epoch,
        "max_steps": up("optim.epochs") * epoch,
        "weight_decay": up("optim.weight_decay"),
        "weight_decay_end": up("optim.weight_decay_end"),
        "base_lr": up("optim.base_lr"),
        "warmup_steps": up("optim.warmup_epochs") * epoch,
        "min_lr": up("optim.min_lr"),
        "clip_grad": up("optim.clip_grad"),
        "freeze_last_layer_steps": up("optim.freeze_last_layer_epochs") * epoch,
        "lr_scaling": up("optim.scaling_rule"),
        "patch_embed_lr_mult": up("optim.patch_embed_lr_mult"),
        "layerwise_decay": up("optim.layerwise_decay"),
        "adam_beta1": up("optim.adamw_beta1"),
        "adam_beta2": up("optim.adamw_beta2"),
        "global_crops_scale": up("crops.global_crops_scale"),
        "local_crops_number": up("crops.local_crops_number"),
        "local_crops_scale": up("crops.local_crops_scale"),
        "global_crop_size": up("crops.global_crops_size"),
        "local_crop_size": up("crops.local_crops_size"),
        "mixed_precision": up("compute_precision.student.backbone.mixed_precision.param_dtype"),
        **DINOV2_CODE,
    }
    return values, read


def parse_command(command: str) -> dict:
    """`--flag value` and bare `--flag` (True) of a command line, numbers as numbers."""
    words, flags = shlex.split(command), {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else True
            if isinstance(value, str):
                try:
                    value = int(value)
                except ValueError:
                    try:
                        value = float(value)
                    except ValueError:
                        pass
            flags[word[2:]] = value
    return flags


def deit_values(flags: dict) -> tuple[dict, set[str]]:
    """Our keys -> DeiT III values of a README command (with DeiT's code defaults), and the flags read."""
    read: set[str] = set()

    def up(flag: str):
        read.add(flag)
        return flags[flag]

    assert flags["model"] == "deit_base_patch16_LS"  # DEIT_CODE describes this model
    processes = flags["nodes"] * flags["ngpus"]
    # RASampler: each process draws len(dataset) // 256 * 256 / processes samples an epoch; drop_last batches
    steps_per_epoch = IMAGENET_1K_TRAIN // 256 * 256 // processes // up("batch")
    values = {
        **DEIT_CODE,
        "batch_size_per_device": flags["batch"],
        "base_lr": up("lr"),
        "lr_scaling": "none" if up("unscale-lr") else "linear_wrt_512",
        "max_steps": up("epochs") * steps_per_epoch,
        "warmup_steps": up("warmup-epochs") * steps_per_epoch,
        "weight_decay": up("weight-decay"),
        "weight_decay_end": up("weight-decay"),  # constant in DeiT
        "lr_schedule": up("sched"),
        "global_crop_size": up("input-size"),
        "random_erasing": up("reprob"),
        "label_smoothing": up("smoothing"),
        "dropout": up("drop"),
        "seed": up("seed"),
        "optimizer": up("opt"),
        "warmup_start_lr": up("warmup-lr"),
        "mixup_alpha": up("mixup"),
        "cutmix_alpha": up("cutmix"),
        "model.drop_path_rate": up("drop-path"),
        "repeated_augmentations": 3 if up("repeated-aug") else 1,
        "supervised_loss": "bce" if up("bce-loss") else "ce",
        "color_jitter": up("color-jitter"),
        "three_augment": up("ThreeAugment"),
    }
    return values, read


def upstream_values(upstream: str) -> tuple[dict, list[str]]:
    """Our keys -> upstream values, and the upstream keys that are neither compared nor set aside."""
    if upstream.startswith("dinov2/configs/"):
        default = ssl_default_config()
        snapshots = {"dinov2/configs/train/vitl14.yaml": VITL14_YAML}
        cfg = (
            default
            if upstream.endswith("ssl_default_config.yaml")
            else merge(default, yaml.safe_load(snapshots[upstream]))
        )
        values, read = dinov2_values(cfg)
        aside = {key for key in leaves(cfg) if key in DINOV2_SET_ASIDE or key.split(".")[0] + ".*" in DINOV2_SET_ASIDE}
        return values, sorted(set(leaves(cfg)) - read - aside)
    assert upstream == "deit/README_revenge.md", upstream
    flags = parse_command(DEIT3_VITB_COMMAND)
    values, read = deit_values(flags)
    return values, sorted(set(flags) - read - set(DEIT_SET_ASIDE))


def our_values(name: str) -> dict:
    """The effective values of a shipped recipe (defaults included), with the model's and our code's pseudo-keys."""
    config = load_config(name)
    model = ViTRegConfig(**model_config_kwargs(config))  # also: every model key of the recipe is a real one
    values = {key: value for key, value in config.to_dict().items() if key != "model"}
    for key in ("n_prototypes", "bottleneck_dim", "n_layers", "hidden_dim"):  # one size for both heads
        values[f"ibot_head_{key}"] = values[f"head_{key}"]
    values.update({f"model.{key}": getattr(model, key) for key in vars(model) if not key.startswith("_")})
    values.update(OURS_FIXED)
    return values


def recipe_keys(name: str) -> list[str]:
    """The keys a recipe file sets, model keys as `model.x`."""
    values = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    model = values.pop("model", {})
    return sorted([*values, *(f"model.{key}" for key in model)])


def same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


RECIPES = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
FOLLOWING = [name for name in RECIPES if load_config(name).upstream is not None]


def test_every_recipe_names_its_upstream_and_only_smoke_configs_are_exempt():
    exempt = sorted(set(RECIPES) - set(FOLLOWING))
    assert exempt == ["smoke-dinov2", "smoke-supervised"]
    assert sorted(DEVIATIONS) == sorted(FOLLOWING)
    for name in FOLLOWING:
        upstream = load_config(name).upstream
        header = [line for line in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
        assert any(f"Upstream: {upstream}" in line for line in header), f"{name}: the header must name {upstream}"


@pytest.mark.parametrize("name", FOLLOWING)
def test_the_recipe_differs_from_its_upstream_only_where_listed(name):
    upstream, unaccounted = upstream_values(load_config(name).upstream)
    assert not unaccounted, f"upstream keys neither compared nor set aside: {unaccounted}"
    ours = our_values(name)
    allowed = DEVIATIONS[name]
    differences = {key: (value, ours[key]) for key, value in upstream.items() if not same(value, ours[key])}
    unexpected = {key: diff for key, diff in differences.items() if key not in allowed}
    assert not unexpected, f"{name}: differences from upstream (upstream, ours) without a reason: {unexpected}"
    for key, (upstream_value, our_value, reason) in allowed.items():
        assert reason and key in differences, f"{name}: {key} is listed as a deviation but matches upstream"
        assert same(differences[key][0], upstream_value) and same(differences[key][1], our_value), (
            key,
            differences[key],
        )


@pytest.mark.parametrize("name", FOLLOWING)
def test_every_key_of_the_recipe_is_compared_or_ours_alone(name):
    upstream, _ = upstream_values(load_config(name).upstream)
    ours_only = OURS_ONLY | (OURS_ONLY_DEIT if name.startswith("deit3") else {})
    unaccounted = [key for key in recipe_keys(name) if key not in upstream and key not in ours_only]
    assert not unaccounted, f"{name}: keys with no upstream counterpart and no reason: {unaccounted}"


def test_the_deit3_recipe_is_the_readme_command():
    flags = parse_command(DEIT3_VITB_COMMAND)
    assert flags["batch"] * flags["ngpus"] * flags["nodes"] == 2048 and flags["repeated-aug"] is True
    config = load_config("deit3-vitb16-reg4-supervised-imagenet")
    assert config.max_steps == 800 * 625 and config.model["drop_path_uniform"] and config.repeated_augmentations == 3
    ddp = yaml.safe_load((CONFIG_DIR / "accelerate" / "ddp.yaml").read_text())
    assert ddp["num_processes"] * config.batch_size_per_device == 2048  # lr 3e-3 is unscaled: the global batch matters
