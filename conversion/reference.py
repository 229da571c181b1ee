"""Independent implementations to check conversions against: timm (loading DINOv2 files through its own converter)
and transformers' Dinov2 / Dinov2WithRegisters."""

from functools import partial
from pathlib import Path

import torch
from torch import nn

from vitreg.modeling_vitreg import ViTRegConfig


def timm_available() -> bool:
    """Whether timm can be imported."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_model(config: ViTRegConfig, no_embed_class: bool) -> nn.Module:
    """An empty timm VisionTransformer with the architecture of `config` (any input size)."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    hidden = config.mlp_hidden_size * (2 if config.use_swiglu_ffn else 1)
    mlp = {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU} if config.use_swiglu_ffn else {}
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=(hidden + 0.5) / config.hidden_size,  # timm takes int(D * ratio)
        qkv_bias=config.qkv_bias,
        proj_bias=config.proj_bias,
        init_values=config.layerscale_value,
        class_token=config.use_cls_token,
        reg_tokens=config.num_register_tokens,
        no_embed_class=no_embed_class,
        global_pool="avg" if config.pooling == "mean" else "token",
        fc_norm=config.use_fc_norm,
        num_classes=0,
        dynamic_img_size=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        **mlp,
    ).eval()


def timm_reference(state_dict: dict[str, torch.Tensor], source_format: str, config: ViTRegConfig) -> nn.Module:
    """timm's model of a DINOv2-layout (via timm's `checkpoint_filter_fn`) or timm-layout state dict."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if source_format.startswith("dinov2"):
        # timm's DINOv2 converter folds the CLS position into the token for register models.
        model = timm_model(config, no_embed_class=config.num_register_tokens > 0)
        weights = checkpoint_filter_fn(dict(state_dict), model)
    else:
        model = timm_model(config, no_embed_class=not config.cls_token_position_embedding)
        weights = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    model.load_state_dict(weights, strict=True)
    return model.float()


def transformers_reference(folder: str | Path) -> nn.Module:
    """transformers' own model of a Dinov2 / Dinov2WithRegisters folder."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def reference_tokens(reference: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Every output token `[B, P + HW, D]` of a reference model (final norm applied, as DINOv2 returns them)."""
    if hasattr(reference, "forward_features"):  # timm
        return reference.forward_features(pixel_values)
    return reference(pixel_values=pixel_values).last_hidden_state


def comparison_sizes(config: ViTRegConfig, native_only: bool = False) -> list[tuple[int, int]]:
    """The native square size and a non-square one (224x308 at patch 14)."""
    native = (config.image_size, config.image_size)
    return [native] if native_only else [native, (16 * config.patch_size, 22 * config.patch_size)]


@torch.no_grad()
def max_token_difference(
    model: nn.Module, reference: nn.Module, sizes: list[tuple[int, int]], seed: int = 0
) -> dict[tuple[int, int], float]:
    """Max abs difference over every token (CLS, registers, patches) of `model` and `reference`, per image size."""
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for height, width in sizes:
        pixels = torch.randn(1, model.config.num_channels, height, width, generator=generator)
        ours = model(pixel_values=pixels).last_hidden_state.float()
        theirs = reference_tokens(reference, pixels).float()
        if ours.shape != theirs.shape:
            raise ValueError(f"token shapes differ at {height}x{width}: {list(ours.shape)} vs {list(theirs.shape)}")
        differences[(height, width)] = (ours - theirs).abs().max().item()
    return differences
