"""The eight official DINOv2 hub backbones as data: names, shapes and the interpolation each one was trained with."""

from dataclasses import dataclass

from modeling_vitreg import ViTRegConfig

OFFICIAL_IMAGE_SIZE = 518
OFFICIAL_PATCH_SIZE = 14


@dataclass(frozen=True)
class OfficialArchitecture:
    """One official backbone, e.g. `dinov2_vitb14_reg4` (its file is `dinov2_vitb14_reg4_pretrain.pth`)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # MLP hidden width; for SwiGLU the width of each gated half
    use_swiglu_ffn: bool
    num_register_tokens: int

    @property
    def folder_name(self) -> str:
        """Name of the converted folder: `dinov2_vitb14_reg4` -> `dinov2-vitb14-reg4`."""
        return self.name.replace("_", "-")

    @property
    def file_name(self) -> str:
        """File name of the official backbone checkpoint."""
        return f"{self.name}_pretrain.pth"

    def config(self, **overrides) -> ViTRegConfig:
        """The ViTReg config of this backbone (overrides shrink it for tests and demos)."""
        fields = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            use_swiglu_ffn=self.use_swiglu_ffn,
            num_register_tokens=self.num_register_tokens,
            image_size=OFFICIAL_IMAGE_SIZE,
            patch_size=OFFICIAL_PATCH_SIZE,
            layerscale_value=1.0,
            layer_norm_eps=1e-6,
            **interpolation(self.num_register_tokens),
        )
        fields.update(overrides)
        return ViTRegConfig(**fields)


def interpolation(num_register_tokens: int) -> dict:
    """DINOv2's position interpolation per family: antialiased resize with registers, the 0.1-offset scale without."""
    if num_register_tokens:
        return {"interpolate_antialias": True, "interpolate_offset": 0.0}
    return {"interpolate_antialias": False, "interpolate_offset": 0.1}


# name, width, depth, heads, MLP hidden, SwiGLU; each exists without registers and with 4 (`_reg4`).
_SIZES = [
    ("vits14", 384, 12, 6, 1536, False),
    ("vitb14", 768, 12, 12, 3072, False),
    ("vitl14", 1024, 24, 16, 4096, False),
    ("vitg14", 1536, 40, 24, 4096, True),
]

OFFICIAL_ARCHITECTURES: dict[str, OfficialArchitecture] = {
    arch.name: arch
    for size, dim, depth, heads, hidden, swiglu in _SIZES
    for registers in (0, 4)
    for arch in [
        OfficialArchitecture(
            f"dinov2_{size}" + ("_reg4" if registers else ""), dim, depth, heads, hidden, swiglu, registers
        )
    ]
}

HEAD_KINDS = {"linear": 1, "linear4": 4}  # official head file suffix -> blocks whose CLS token the head reads


def match_official(config: ViTRegConfig) -> OfficialArchitecture | None:
    """The official backbone whose exact shape `config` has, if any."""
    for arch in OFFICIAL_ARCHITECTURES.values():
        if (
            config.hidden_size == arch.hidden_size
            and config.num_hidden_layers == arch.num_hidden_layers
            and config.mlp_hidden_size == arch.intermediate_size
            and config.use_swiglu_ffn == arch.use_swiglu_ffn
            and config.num_register_tokens == arch.num_register_tokens
            and config.image_size == OFFICIAL_IMAGE_SIZE
            and config.patch_size == OFFICIAL_PATCH_SIZE
            and config.use_cls_token
        ):
            return arch
    return None
