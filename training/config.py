"""The training configuration: one flat dataclass, read from YAML, overridable by flags, validated up front."""

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitreg.core.errors import UserError

OBJECTIVES = ("dinov2", "supervised")
CENTERINGS = ("centering", "sinkhorn_knopp")
LR_SCALINGS = ("sqrt_wrt_1024", "linear_wrt_256", "none")
SUPERVISED_LOSSES = ("bce", "ce")
BLUR_CONVENTIONS = ("official_code", "paper")
CONFIG_DIR = Path(__file__).parent / "configs"
POSITIVE_KEYS = (
    "batch_size_per_device max_steps logging_steps checkpointing_steps checkpoints_total_limit global_crop_size "
    "local_crop_size head_n_prototypes head_hidden_dim head_bottleneck_dim head_n_layers sinkhorn_iterations"
).split()
NON_NEGATIVE_KEYS = (
    "num_workers warmup_steps warmup_teacher_temp_steps freeze_last_layer_steps local_crops_number mask_min_patches "
    "min_lr weight_decay weight_decay_end clip_grad label_smoothing mixup_alpha cutmix_alpha color_jitter "
    "dino_loss_weight ibot_loss_weight koleo_loss_weight"
).split()


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run. Lengths are in optimizer steps; batch sizes are per device."""

    objective: str = "dinov2"
    # ViTRegConfig fields of the student; image_size defaults to global_crop_size.
    model: dict = field(default_factory=dict)

    # data
    data_dir: str | None = None
    dataset: str | None = None
    dataset_split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    num_workers: int = 4
    batch_size_per_device: int = 64
    seed: int = 0

    # length, logging, checkpoints
    max_steps: int = 125_000
    logging_steps: int = 10
    checkpointing_steps: int = 1250
    checkpoints_total_limit: int = 3
    report_to: str | None = None  # "tensorboard", or any tracker accelerate knows
    mixed_precision: str | None = None  # None: what `accelerate launch` / `accelerate config` chose
    gradient_checkpointing: bool = False
    num_threads: int | None = None  # intra-op CPU threads per process (None: torch's default); 1 suits tiny models
    peak_tflops: float | None = None  # accelerator peak (e.g. 989 for H100/H200 bf16): enables the MFU column

    # optimisation (AdamW)
    base_lr: float = 0.004
    lr_scaling: str = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_steps: int = 12_500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 3.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2

    # crops (supervised uses the global crop only)
    global_crop_size: int = 224
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crop_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    # DINOv2's GaussianBlur(p) hands torchvision's RandomApply 1 - p, so the released checkpoints were trained with
    # blur probabilities 0 / 0.9 / 0.5 (global crop 1 / global crop 2 / local crops); the paper states 1.0 / 0.1 / 0.5.
    blur_convention: str = "official_code"  # "official_code" (the released checkpoints' behaviour) or "paper"

    # DINOv2: DINO head and loss
    dino_loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_n_layers: int = 3
    centering: str = "centering"
    center_momentum: float = 0.9
    sinkhorn_iterations: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 37_500
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    freeze_last_layer_steps: int = 1250
    koleo_loss_weight: float = 0.1
    # DINOv2: iBOT
    ibot_loss_weight: float = 1.0
    ibot_separate_head: bool = False
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_min_patches: int = 4

    # supervised (DeiT III)
    supervised_loss: str = "bce"
    label_smoothing: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    three_augment: bool = True
    color_jitter: float = 0.3
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0

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


def coerce(key: str, value):
    """Check a value against the field's type; ints pass as floats, lists become tuples."""
    spec = FIELDS[key]
    default = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    annotation = str(spec.type)
    if value is None:
        if default is None:
            return None
        raise UserError(f"config {key} must not be null")
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_number(v) for v in value):
            raise UserError(f"config {key} must be a pair of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int) or annotation.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float) or "float" in annotation:
        ok = is_number(value)
        value = float(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise UserError(f"config {key} has the wrong type: {value!r} ({annotation})")
    return value


def is_number(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(c: TrainConfig) -> None:
    """Refuse values that cannot train, naming the key, before anything is built."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"config: {message}")

    need(c.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {c.objective!r}")
    need(c.centering in CENTERINGS, f"centering must be one of {CENTERINGS}, got {c.centering!r}")
    need(c.lr_scaling in LR_SCALINGS, f"lr_scaling must be one of {LR_SCALINGS}, got {c.lr_scaling!r}")
    need(c.supervised_loss in SUPERVISED_LOSSES, f"supervised_loss must be one of {SUPERVISED_LOSSES}")
    need(c.blur_convention in BLUR_CONVENTIONS, f"blur_convention must be one of {BLUR_CONVENTIONS}")
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
    need(c.data_dir is None or c.dataset is None, "give data_dir or dataset, not both")


def model_config_kwargs(c: TrainConfig) -> dict:
    """ViTRegConfig keyword arguments of the student: DINOv2 defaults, then the config's `model` entries."""
    kwargs = dict(image_size=c.global_crop_size, drop_path_uniform=True, layerscale_value=1e-5)
    kwargs.update(c.model)
    return kwargs
