"""Analytic FLOPs of a training step (matmuls only, 2 FLOPs per multiply-add), for MFU as nanoGPT reports it."""

from vitreg.modeling_vitreg import ViTRegConfig

from .config import TrainConfig


def vit_forward_flops(config: ViTRegConfig, image_size: int) -> float:
    """Forward FLOPs of the backbone on one square image."""
    d, p = config.hidden_size, config.patch_size
    patches = (image_size // p) ** 2
    tokens = config.num_prefix_tokens + patches
    mlp_in = 2 * config.mlp_hidden_size if config.use_swiglu_ffn else config.mlp_hidden_size
    per_block = 2 * tokens * (3 * d * d + d * d + d * mlp_in + config.mlp_hidden_size * d) + 4 * tokens * tokens * d
    return 2 * patches * 3 * p * p * d + config.num_hidden_layers * per_block


def head_flops(config: TrainConfig, in_dim: int) -> float:
    """Forward FLOPs of the DINO head on one token."""
    c = config
    return 2 * (
        in_dim * c.head_hidden_dim
        + (c.head_n_layers - 2) * c.head_hidden_dim**2
        + c.head_hidden_dim * c.head_bottleneck_dim
        + c.head_bottleneck_dim * c.head_n_prototypes
    )


def train_step_flops(config: TrainConfig, model_config: ViTRegConfig) -> float:
    """FLOPs of one optimizer step on one device: 3x forward for the student (with backward), 1x for the teacher."""
    c, batch = config, config.batch_size_per_device
    if c.objective == "supervised":
        return 3 * batch * vit_forward_flops(model_config, c.global_crop_size)
    global_fwd = 2 * batch * vit_forward_flops(model_config, c.global_crop_size)
    local_fwd = c.local_crops_number * batch * vit_forward_flops(model_config, c.local_crop_size)
    patches = (c.global_crop_size // model_config.patch_size) ** 2
    masked = 2 * batch * c.mask_sample_probability * sum(c.mask_ratio_min_max) / 2 * patches
    head = head_flops(c, model_config.hidden_size)
    student = global_fwd + local_fwd + ((2 + c.local_crops_number) * batch + masked) * head
    teacher = global_fwd + (2 * batch + masked) * head
    return 3 * student + teacher


def mfu(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation of one device: achieved FLOP/s over the peak."""
    return flops_per_step / seconds_per_step / (peak_tflops * 1e12)
