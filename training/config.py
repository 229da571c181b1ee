"""The training configuration: one flat dataclass, read from YAML, overridable by flags, validated up front.

Each field's type is the contract: `Literal[...]` lists the accepted words, the validation reads the choices from
it, and each field's `help` metadata is what `vitreg pretrain --help` shows next to the field's default.
"""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegConfig

CONFIG_DIR = Path(__file__).parent / "configs"
POSITIVE_KEYS = (
    "batch_size_per_device max_steps logging_steps checkpointing_steps checkpoints_total_limit global_crop_size "
    "local_crop_size head_n_prototypes head_hidden_dim head_bottleneck_dim head_n_layers sinkhorn_iterations "
    "repeated_augmentations"
).split()
NON_NEGATIVE_KEYS = (
    "num_workers warmup_steps warmup_teacher_temp_steps freeze_last_layer_steps local_crops_number mask_min_patches "
    "min_lr weight_decay weight_decay_end clip_grad label_smoothing mixup_alpha cutmix_alpha color_jitter "
    "dino_loss_weight ibot_loss_weight koleo_loss_weight shuffle_buffer_size"
).split()


def option(default, help: str):
    """A config field: its default and the help text `--help` shows."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run. Lengths are in optimizer steps; batch sizes are per device."""

    objective: Literal["dinov2", "supervised"] = option(
        "dinov2", "DINOv2 self-supervised (EMA teacher, DINO + iBOT + KoLeo) or DeiT III supervised classification"
    )
    model: dict = option(
        {},
        "ViTRegConfig fields of the student; image_size defaults to global_crop_size (a DINOv3-style RoPE ViT: "
        "position_embedding_type: rope, mask_k_bias, untie_cls_and_patch_norms, rope_rescale_coords, ...)",
    )
    upstream: str | None = option(
        None, "the upstream recipe this config follows (documentation; tests/test_recipes_upstream.py checks it)"
    )

    # data
    data_dir: str | None = option(None, "image folder read as a datasets imagefolder (class subfolders = labels)")
    dataset: str | None = option(
        None, "streamed dataset: a local folder (imagefolder or parquet files) or a Hub dataset name (needs network)"
    )
    dataset_split: str = option("train", "split of data_dir / dataset to train on")
    image_column: str = option("image", "column holding the images")
    label_column: str = option("label", "column holding the class labels (supervised)")
    num_workers: int = option(4, "DataLoader worker processes per device (augmentation runs there)")
    shuffle_buffer_size: int = option(
        10_000, "examples in the shuffle buffer of a streamed dataset; 0: shard order only (exact resume)"
    )
    repeated_augmentations: int = option(
        1, "DeiT's repeated augmentation: each image n times per epoch, copies on different processes"
    )
    batch_size_per_device: int = option(64, "images per device per optimizer step")
    seed: int = option(0, "seed of initialisation, data order and every augmentation")

    # length, logging, checkpoints
    max_steps: int = option(125_000, "optimizer steps of the run (DINOv2: epochs x 1250)")
    logging_steps: int = option(10, "steps between metrics.jsonl lines")
    checkpointing_steps: int = option(1250, "steps between checkpoints")
    checkpoints_total_limit: int = option(3, "newest checkpoints kept")
    report_to: str | None = option(None, "tracker for accelerate.log: tensorboard, wandb, ... (null: none)")
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = option(
        None, "autocast precision (null: what `accelerate launch` / `accelerate config` chose)"
    )
    gradient_checkpointing: bool = option(False, "recompute block activations in backward to save memory")
    num_threads: int | None = option(
        None, "intra-op CPU threads per process (null: torch's default); 1 suits tiny models"
    )
    peak_tflops: float | None = option(
        None, "accelerator peak TFLOP/s (e.g. 989 for H100/H200 bf16): adds the MFU column"
    )

    # optimisation (AdamW)
    base_lr: float = option(0.004, "peak learning rate before lr_scaling")
    lr_scaling: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = option(
        "sqrt_wrt_1024", "peak lr = base_lr x sqrt(batch / 1024) (DINOv2), x batch / 256, or base_lr as is"
    )
    min_lr: float = option(1e-6, "learning rate at the end of the cosine")
    warmup_steps: int = option(12_500, "linear lr warmup steps")
    weight_decay: float = option(0.04, "weight decay at the start (cosine schedule)")
    weight_decay_end: float = option(0.4, "weight decay at the end")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    clip_grad: float = option(3.0, "gradient norm clipping (0: none)")
    layerwise_decay: float = option(0.9, "layer-wise lr decay per block (1: none)")
    patch_embed_lr_mult: float = option(0.2, "lr multiplier of the patch embedding")

    # crops (supervised uses the global crop only)
    global_crop_size: int = option(224, "side of the global crops (the supervised crop)")
    global_crops_scale: tuple[float, float] = option((0.32, 1.0), "area range of the global RandomResizedCrop")
    local_crops_number: int = option(8, "local crops per image (DINOv2)")
    local_crop_size: int = option(
        98, "side of the local crops (DINOv2), a multiple of the patch size: 98 for patch 14 as DINOv2's ViT/14 recipes"
    )
    local_crops_scale: tuple[float, float] = option((0.05, 0.32), "area range of the local RandomResizedCrop")
    # DINOv2's GaussianBlur(p) hands torchvision's RandomApply 1 - p, so the released checkpoints were trained with
    # blur probabilities 0 / 0.9 / 0.5 (global crop 1 / global crop 2 / local crops); the paper states 1.0 / 0.1 / 0.5.
    blur_convention: Literal["official_code", "paper"] = option(
        "official_code", "blur probabilities of DINOv2's code (0 / 0.9 / 0.5, it passes 1 - p) or its paper's"
    )

    # DINOv2: DINO head and loss
    dino_loss_weight: float = option(1.0, "weight of the DINO (CLS) loss")
    head_n_prototypes: int = option(65536, "prototypes K of the DINO / iBOT heads")
    head_hidden_dim: int = option(2048, "hidden width of the heads' MLP")
    head_bottleneck_dim: int = option(256, "bottleneck width before the prototypes")
    head_n_layers: int = option(3, "linear layers of the heads' MLP")
    centering: Literal["centering", "sinkhorn_knopp"] = option(
        "centering", "teacher targets: EMA centering or Sinkhorn-Knopp (DINOv2 L/g)"
    )
    center_momentum: float = option(0.9, "EMA momentum of the teacher centers")
    sinkhorn_iterations: int = option(3, "Sinkhorn-Knopp iterations")
    student_temp: float = option(0.1, "student softmax temperature")
    teacher_temp: float = option(0.07, "teacher temperature after its warmup")
    warmup_teacher_temp: float = option(0.04, "teacher temperature at step 0")
    warmup_teacher_temp_steps: int = option(37_500, "steps of the teacher temperature warmup")
    momentum_teacher: float = option(0.992, "EMA momentum of the teacher at the start (cosine to the final value)")
    final_momentum_teacher: float = option(1.0, "EMA momentum of the teacher at the end")
    freeze_last_layer_steps: int = option(1250, "steps during which the prototypes do not learn")
    koleo_loss_weight: float = option(0.1, "weight of the KoLeo regulariser")
    # DINOv2: iBOT
    ibot_loss_weight: float = option(1.0, "weight of the iBOT masked-patch loss (0: no masking)")
    ibot_separate_head: bool = option(False, "a separate iBOT head (DINOv2 L/g) instead of sharing the DINO head")
    mask_sample_probability: float = option(0.5, "share of global crops that get an iBOT mask")
    mask_ratio_min_max: tuple[float, float] = option((0.1, 0.5), "range of the masked patch ratio")
    mask_min_patches: int = option(4, "smallest masked block, in patches")

    # supervised (DeiT III)
    supervised_loss: Literal["bce", "ce"] = option("bce", "binary cross-entropy (DeiT III) or cross-entropy")
    label_smoothing: float = option(0.0, "label smoothing of the targets")
    crop_scale: tuple[float, float] = option((0.08, 1.0), "area range of the supervised RandomResizedCrop")
    three_augment: bool = option(True, "DeiT III's 3-Augment: one of grayscale / solarize / blur per image")
    color_jitter: float = option(0.3, "colour jitter strength (0: none)")
    mixup_alpha: float = option(0.8, "MixUp alpha (0: off)")
    cutmix_alpha: float = option(1.0, "CutMix alpha (0: off)")

    def global_batch_size(self, num_processes: int) -> int:
        """Images per optimizer step over all processes."""
        return self.batch_size_per_device * num_processes

    def peak_lr(self, num_processes: int) -> float:
        """`base_lr` scaled to the global batch size by `lr_scaling`, as DINOv2 / DeiT do."""
        batch = self.global_batch_size(num_processes)
        if self.lr_scaling == "sqrt_wrt_1024":
            return self.base_lr * math.sqrt(batch / 1024)
        if self.lr_scaling == "linear_wrt_256":
            return self.base_lr * batch / 256
        return self.base_lr

    def to_dict(self) -> dict:
        """A JSON/YAML-ready copy (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)


def field_default(name: str):
    """The default value of a config key."""
    spec = FIELDS[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def base_type(name: str):
    """The field's type without `| None`."""
    hint = TYPES[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def nullable(name: str) -> bool:
    """Whether the key accepts null."""
    hint = TYPES[name]
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return union and type(None) in typing.get_args(hint)


def choices(name: str) -> tuple[str, ...] | None:
    """The accepted words of a `Literal` key, None for other keys."""
    hint = base_type(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def resolve_config_path(path: str) -> Path:
    """A config file path, or the name of a shipped config (`smoke-dinov2`)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = CONFIG_DIR / (path if path.endswith(".yaml") else f"{path}.yaml")
    if shipped.is_file():
        return shipped
    raise UserError(f"config file {path} not found (shipped: {', '.join(p.stem for p in CONFIG_DIR.glob('*.yaml'))})")


def load_config(path: str | None, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML config, apply flag overrides (dict values merge), check every value; refuse unknown keys."""
    values = {}
    if path is not None:
        try:
            values = yaml.safe_load(resolve_config_path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise UserError(f"config {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config {path} must be a mapping of keys to values")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}")
    config = TrainConfig(**{key: coerce(key, value) for key, value in values.items()})
    validate(config)
    return config


def type_name(name: str) -> str:
    """The field's type as a user reads it: `int`, `float or null`, `one of 'a', 'b'`, ..."""
    hint, allowed = base_type(name), choices(name)
    if allowed:
        text = "one of " + ", ".join(repr(word) for word in allowed)
    elif typing.get_origin(hint) is tuple:
        text = "a pair of numbers"
    else:
        text = hint.__name__ if isinstance(hint, type) else str(hint)
    return f"{text} or null" if nullable(name) else text


def coerce(key: str, value):
    """Check a value against the field's type; ints pass as floats, lists become tuples."""
    hint = base_type(key)
    if value is None:
        if nullable(key):
            return None
        raise UserError(f"config {key} must not be null")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_number(v) for v in value):
            raise UserError(f"config {key} must be a pair of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = is_number(value)
        value = float(value) if ok else value
    elif hint is dict:
        ok = isinstance(value, dict)
    else:  # str and Literal words (the word itself is checked by `validate`)
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"config {key} has the wrong type: {value!r} (expected {type_name(key)})")
    return value


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(c: TrainConfig) -> None:
    """Refuse values that cannot train, naming the key, before anything is built."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"config: {message}")

    for key in FIELDS:
        allowed = choices(key)
        value = getattr(c, key)
        if allowed and not (value is None and nullable(key)):
            need(value in allowed, f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    for key in POSITIVE_KEYS:
        need(getattr(c, key) > 0, f"{key} must be positive, got {getattr(c, key)}")
    for key in NON_NEGATIVE_KEYS:
        need(getattr(c, key) >= 0, f"{key} must be >= 0, got {getattr(c, key)}")
    need(c.num_threads is None or c.num_threads > 0, f"num_threads must be positive, got {c.num_threads}")
    need(c.base_lr > 0, f"base_lr must be positive, got {c.base_lr}")
    need(c.min_lr <= c.base_lr, f"min_lr ({c.min_lr}) must not exceed base_lr ({c.base_lr})")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp", "layerwise_decay", "patch_embed_lr_mult"):
        need(getattr(c, key) > 0, f"{key} must be positive, got {getattr(c, key)}")
    for key in (
        "adam_beta1",
        "adam_beta2",
        "center_momentum",
        "momentum_teacher",
        "final_momentum_teacher",
        "mask_sample_probability",
        "label_smoothing",
    ):
        need(0 <= getattr(c, key) <= 1, f"{key} must lie in [0, 1], got {getattr(c, key)}")
    for key in ("global_crops_scale", "local_crops_scale", "mask_ratio_min_max", "crop_scale"):
        low, high = getattr(c, key)
        need(0 <= low <= high <= 1, f"{key} must be [low, high] with 0 <= low <= high <= 1, got {[low, high]}")
    need(
        c.objective != "dinov2" or c.local_crop_size <= c.global_crop_size,
        f"local_crop_size ({c.local_crop_size}) is bigger than global_crop_size ({c.global_crop_size})",
    )
    patch = c.model.get("patch_size", 14)
    need(isinstance(patch, int) and patch > 0, f"model.patch_size must be a positive int, got {patch!r}")
    for key in ("global_crop_size", "local_crop_size") if c.objective == "dinov2" else ("global_crop_size",):
        need(getattr(c, key) % patch == 0, f"{key} ({getattr(c, key)}) is not a multiple of the patch size {patch}")
    image_size = c.model.get("image_size", c.global_crop_size)
    need(
        c.global_crop_size <= image_size * 4,
        f"global_crop_size ({c.global_crop_size}) is far bigger than model.image_size ({image_size})",
    )
    need(
        c.objective != "supervised" or c.supervised_loss != "bce" or not c.label_smoothing,
        "label_smoothing must be 0 with supervised_loss 'bce': DeiT III's BCE binarises the mixed targets, so "
        "smoothing would make every class a positive (use supervised_loss 'ce' for label smoothing)",
    )
    validate_model(c)
    need(c.data_dir is None or c.dataset is None, "give data_dir or dataset, not both")
    need(
        c.repeated_augmentations == 1 or c.dataset is None,
        "repeated_augmentations needs data_dir: the sampler repeats dataset indices, and a stream has none",
    )


def validate_model(c: TrainConfig) -> None:
    """Refuse `model` entries that describe no ViTReg (unknown field, RoPE settings, ...) before anything is built."""
    unknown = sorted(set(c.model) - set(ViTRegConfig().to_dict()) - {"num_labels"})
    if unknown:  # PreTrainedConfig keeps any keyword as an attribute: a misspelt field would be silently ignored
        raise UserError(f"config model: unknown ViTRegConfig field(s): {', '.join(unknown)}")
    try:
        ViTRegConfig(**model_config_kwargs(c))
    except (TypeError, ValueError) as error:
        raise UserError(f"config model: {error}") from None
    if c.model.get("untie_global_and_local_cls_norm"):
        # DINOv3's trainer norms the local crops' CLS with it; ViTReg's trainers have no such path, so it would never
        # train (it exists for converted checkpoints to export back unchanged).
        raise UserError(
            "config model: untie_global_and_local_cls_norm is for converted DINOv3 checkpoints only; "
            "ViTReg's trainers norm every crop with the same norms (use untie_cls_and_patch_norms)"
        )


def model_config_kwargs(c: TrainConfig) -> dict:
    """ViTRegConfig keyword arguments of the student: DINOv2 defaults, then the config's `model` entries."""
    kwargs = dict(image_size=c.global_crop_size, drop_path_uniform=True, layerscale_value=1e-5)
    kwargs.update(c.model)
    return kwargs
