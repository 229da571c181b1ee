"""Independent implementations to check conversions against: timm (loading DINOv2 and DINOv3 files through its own
converters) and transformers' Dinov2 / Dinov2WithRegisters / DINOv3ViT."""

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


def timm_dinov3_unsupported(config: ViTRegConfig) -> str | None:
    """What of a DINOv3 `config` timm's Eva cannot express (named for a message), or None."""
    unsupported = {
        "cls_norm (untied CLS and patch norms)": config.untie_cls_and_patch_norms,
        "RoPE by min and max period": config.rope_theta is None,
        f"rope_normalize_coords={config.rope_normalize_coords!r}": config.rope_normalize_coords != "separate",
        "learned key bias": config.qkv_bias and not config.mask_k_bias,
        "model without projection or MLP biases": not (config.proj_bias and config.ffn_bias),
    }
    return next((name for name, present in unsupported.items() if present), None)


def timm_dinov3_model(config: ViTRegConfig) -> nn.Module:
    """An empty timm Eva with DINOv3's RoPE (as timm's `vit_*_patch16_dinov3*`) and the architecture of `config`."""
    from timm.layers import LayerNorm
    from timm.models.eva import Eva

    problem = timm_dinov3_unsupported(config)
    if problem:
        raise ValueError(f"timm's DINOv3 model has no {problem}")
    return Eva(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        num_classes=0,
        global_pool="token",
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        qkv_bias=config.qkv_bias,  # q_bias and v_bias; the key bias is a zero buffer
        mlp_ratio=(config.mlp_hidden_size + 0.5) / config.hidden_size,  # timm takes int(D * ratio)
        swiglu_mlp=config.use_swiglu_ffn,
        swiglu_align_to=int(config.use_swiglu_ffn),  # any alignment selects timm's unpacked SwiGLU (fc1_g, fc1_x)
        init_values=config.layerscale_value,
        num_reg_tokens=config.num_register_tokens,
        use_abs_pos_emb=False,
        use_rot_pos_emb=True,
        rope_type="dinov3",
        rope_temperature=config.rope_theta,
        rope_rotate_half=True,
        use_fc_norm=False,
        norm_layer=partial(LayerNorm, eps=config.layer_norm_eps),
        dynamic_img_size=True,
    ).eval()


def timm_dinov3_reference(state_dict: dict[str, torch.Tensor], source_format: str, config: ViTRegConfig) -> nn.Module:
    """timm's model of an official DINOv3 state dict (via timm's own `checkpoint_filter_fn`) or a timm-layout one."""
    from timm.models.eva import checkpoint_filter_fn

    model = timm_dinov3_model(config)
    if source_format == "dinov3-hub":
        weights = checkpoint_filter_fn(dict(state_dict), model)
    else:
        weights = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    model.load_state_dict(weights, strict=True)
    return model.float()


def timm_architecture(folder_config: dict | None) -> str | None:
    """The timm architecture a timm folder or Hub repo names in its `config.json` (None for any other source)."""
    if not folder_config or "model_type" in folder_config:
        return None
    architecture = folder_config.get("architecture")
    return architecture if isinstance(architecture, str) else None


def timm_source_model(folder: Path, image_size: int | None = None, meta: bool = False) -> nn.Module:
    """timm's own model of a timm folder, built from the architecture and arguments its `config.json` records (any
    input size, no classifier; `image_size`: that of its position table); empty on the meta device with `meta`.
    Raises what timm raises for an architecture it does not know."""
    import timm

    size = {"img_size": image_size} if image_size else {}
    with torch.device("meta" if meta else "cpu"):
        model = timm.create_model(f"local-dir:{folder}", pretrained=False, num_classes=0, dynamic_img_size=True, **size)
    return model.eval()


def timm_source_heads(folder: Path, folder_config: dict | None, width: int) -> int | None:
    """The head count of a timm folder's architecture as timm defines it; None without timm, a timm `config.json`,
    an architecture this timm knows, or one whose width is not `width` (a config that does not describe the weights)."""
    if timm_architecture(folder_config) is None or not timm_available():
        return None
    try:
        model = timm_source_model(folder, meta=True)
    except (RuntimeError, ValueError, TypeError, KeyError, OSError):
        return None
    if getattr(model, "embed_dim", None) != width or not getattr(model, "blocks", None):
        return None
    return getattr(getattr(model.blocks[0], "attn", None), "num_heads", None)


def timm_folder_reference(folder: Path, state_dict: dict[str, torch.Tensor], image_size: int) -> nn.Module:
    """timm's own model of a timm folder (architecture and arguments from its `config.json`) with its weights."""
    model = timm_source_model(folder, image_size)
    model.load_state_dict({key: v for key, v in state_dict.items() if not key.startswith("head.")}, strict=True)
    return model.float()


def transformers_reference(folder: str | Path) -> nn.Module:
    """transformers' own model of a Dinov2 / Dinov2WithRegisters / DINOv3ViT folder."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def reference_tokens(reference: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Every output token `[B, P + HW, D]` of a reference model (final norm applied, as DINOv2 returns them)."""
    if hasattr(reference, "forward_features"):  # timm
        return reference.forward_features(pixel_values)
    return reference(pixel_values=pixel_values).last_hidden_state


def comparison_sizes(config: ViTRegConfig, native_only: bool = False) -> list[tuple[int, int]]:
    """The native square size, a larger non-square one (224x308 at patch 14) and a smaller one (126x98)."""
    native, patch = (config.image_size, config.image_size), config.patch_size
    return [native] if native_only else [native, (16 * patch, 22 * patch), (9 * patch, 7 * patch)]


@torch.no_grad()
def token_differences(
    model: nn.Module, reference: nn.Module, sizes: list[tuple[int, int]], seed: int = 0
) -> dict[tuple[int, int], tuple[float, float]]:
    """Per image size: (max abs difference over every token of `model` and `reference`, largest abs value of the
    reference's tokens), the second the scale a relative tolerance is taken of."""
    generator = torch.Generator().manual_seed(seed)
    differences = {}
    for height, width in sizes:
        pixels = torch.randn(1, model.config.num_channels, height, width, generator=generator)
        ours = model(pixel_values=pixels).last_hidden_state.float()  # [1, P + HW, D]
        theirs = reference_tokens(reference, pixels).float()
        if ours.shape != theirs.shape:
            raise ValueError(f"token shapes differ at {height}x{width}: {list(ours.shape)} vs {list(theirs.shape)}")
        differences[(height, width)] = ((ours - theirs).abs().max().item(), theirs.abs().max().item())
    return differences


@torch.no_grad()
def max_token_difference(
    model: nn.Module, reference: nn.Module, sizes: list[tuple[int, int]], seed: int = 0
) -> dict[tuple[int, int], float]:
    """Max abs difference over every token (CLS, registers, patches) of `model` and `reference`, per image size."""
    return {size: difference for size, (difference, _) in token_differences(model, reference, sizes, seed).items()}
