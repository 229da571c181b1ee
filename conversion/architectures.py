"""The eight official DINOv2 hub backbones as ViTReg configs; the table itself is `model_cards.registry`."""

from vitreg.model_cards.registry import HEADS, OFFICIAL_BACKBONES, OfficialBackbone
from vitreg.modeling_vitreg import ViTRegConfig

OFFICIAL_IMAGE_SIZE = 518
OFFICIAL_PATCH_SIZE = 14
OFFICIAL_ARCHITECTURES: dict[str, OfficialBackbone] = OFFICIAL_BACKBONES
HEAD_KINDS = {kind: head.num_layers for kind, head in HEADS.items()}  # head file suffix -> CLS tokens it reads


INTERPOLATIONS = ("source", "dinov2")  # `vitreg convert --interpolation`: the source's own resize, or DINOv2's


def interpolation(num_register_tokens: int) -> dict:
    """DINOv2's position interpolation per family: antialiased resize with registers, the 0.1-offset scale without."""
    if num_register_tokens:
        return {"interpolate_antialias": True, "interpolate_offset": 0.0}
    return {"interpolate_antialias": False, "interpolate_offset": 0.1}


def transformers_interpolation(num_register_tokens: int) -> dict:
    """transformers' Dinov2Model / Dinov2WithRegistersModel (5.x): bicubic to the target size (`size=`, no offset),
    antialiased only with registers; the table itself at the native square grid, as ViTReg's."""
    return {"interpolate_antialias": bool(num_register_tokens), "interpolate_offset": 0.0}


def official_config(arch: OfficialBackbone, **overrides) -> ViTRegConfig:
    """The ViTReg config of an official backbone (overrides shrink it for tests and demos)."""
    fields = dict(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        use_swiglu_ffn=arch.ffn == "swiglu",  # DINOv2's SwiGLU width rule gives ViT-g its 4096
        num_register_tokens=arch.num_register_tokens,
        image_size=OFFICIAL_IMAGE_SIZE,
        patch_size=OFFICIAL_PATCH_SIZE,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        use_mask_token=True,  # every official checkpoint carries one (iBOT's), exported back unchanged
        **interpolation(arch.num_register_tokens),
    )
    fields.update(overrides)
    return ViTRegConfig(**fields)


def match_official(config: ViTRegConfig) -> OfficialBackbone | None:
    """The official backbone whose exact shape `config` has, if any."""
    for arch in OFFICIAL_ARCHITECTURES.values():
        official = official_config(arch)
        if (
            config.hidden_size == official.hidden_size
            and config.num_hidden_layers == official.num_hidden_layers
            and config.mlp_hidden_size == official.mlp_hidden_size
            and config.use_swiglu_ffn == official.use_swiglu_ffn
            and config.num_register_tokens == official.num_register_tokens
            and config.image_size == official.image_size
            and config.patch_size == official.patch_size
            and config.use_cls_token
        ):
            return arch
    return None
