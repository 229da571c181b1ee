"""The eight official DINOv2 hub backbones and their ImageNet linear heads, as one declarative table.

Importable without torch or transformers, so converters can use it to name files and repositories.
Numbers come from /work/shared/reference (DINOv2 model table and the registers paper).
"""

from dataclasses import dataclass

DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2"  # where DINOv2's hubconf downloads the weights from
IMAGENET_DATASET = "ILSVRC/imagenet-1k"


@dataclass(frozen=True)
class OfficialHead:
    """An ImageNet-1k linear head DINOv2 ships for every backbone."""

    kind: str  # "linear" | "linear4": the file suffix
    num_layers: int  # CLS tokens of the last n blocks it reads (ViTRegConfig.classifier_num_layers)
    description: str


@dataclass(frozen=True)
class OfficialBackbone:
    """One of the eight DINOv2 hub backbones (`torch.hub.load("facebookresearch/dinov2", name)`)."""

    name: str  # e.g. "dinov2_vitb14_reg4"
    size: str  # "small" | "base" | "large" | "giant"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_register_tokens: int
    ffn: str  # "mlp" | "swiglu"
    params_millions: float  # backbone parameters, registers included
    imagenet_linear_top1: float  # published ImageNet-1k linear evaluation top-1 (%)
    base_model: str  # the same weights as ported by Meta to transformers on the Hub

    @property
    def pretrain_file(self) -> str:
        """File name of the official backbone weights."""
        return f"{self.name}_pretrain.pth"

    def head_file(self, kind: str) -> str:
        """File name of the official linear head `kind` ("linear" or "linear4")."""
        return f"{self.name}_{HEADS[kind].kind}_head.pth"

    @property
    def pretrain_url(self) -> str:
        """Official download URL of the backbone weights (as DINOv2's hubconf builds it)."""
        return f"{DINOV2_WEIGHTS_URL}/{self.name.removesuffix('_reg4')}/{self.pretrain_file}"

    def head_url(self, kind: str) -> str:
        """Official download URL of the linear head `kind`."""
        return f"{DINOV2_WEIGHTS_URL}/{self.name.removesuffix('_reg4')}/{self.head_file(kind)}"

    @property
    def repo_name(self) -> str:
        """Hub repository name of the converted backbone (also the folder name a batch conversion writes)."""
        return self.name.replace("_", "-")

    def head_repo_name(self, kind: str) -> str:
        """Hub repository name of the backbone converted with the linear head `kind` (also its batch folder name)."""
        return f"{self.repo_name}-{HEADS[kind].kind}"

    @property
    def arch(self) -> str:
        """Readable architecture, e.g. "ViT-B/14 with 4 registers"."""
        letter = {"small": "S", "base": "B", "large": "L", "giant": "g"}[self.size]
        registers = f" with {self.num_register_tokens} registers" if self.num_register_tokens else ""
        return f"ViT-{letter}/14{registers}"

    @property
    def description(self) -> str:
        """One paragraph on what this backbone is."""
        training = "distilled from DINOv2 ViT-g/14" if self.size != "giant" else "trained from scratch"
        registers = (
            f" It carries {self.num_register_tokens} register tokens, which take the high-norm global "
            "computation that otherwise hijacks background patches, so its patch features and attention maps "
            "are free of artifacts."
            if self.num_register_tokens
            else " It has no register tokens: large DINOv2 models show high-norm artifact patches in their "
            "feature and attention maps."
        )
        return (
            f"DINOv2 {self.arch} ({self.params_millions:.1f}M parameters), a self-supervised image backbone "
            f"by Meta AI {training} on LVD-142M (142M curated images), at 518 px (37x37 patches of 14 px)."
            + registers
        )


HEADS = {
    "linear": OfficialHead("linear", 1, "ImageNet-1k linear head on the CLS token and the mean patch token"),
    "linear4": OfficialHead(
        "linear4", 4, "ImageNet-1k linear head on the CLS tokens of the last 4 blocks and the mean patch token"
    ),
}

# One row per hub backbone. Parameter counts: S 22.06M, B 86.58M, L 304.37M, g 1136.48M, plus 4*D with registers.
# Top-1: the DINOv2 table gives one linear-evaluation number per backbone, not one per head.
_SIZES = {
    # letter: (hub size name, dim, depth, heads, ffn, params_millions, top-1 without registers, top-1 with registers)
    "s": ("small", 384, 12, 6, "mlp", 22.06, 81.1, 80.8),
    "b": ("base", 768, 12, 12, "mlp", 86.58, 84.5, 84.4),
    "l": ("large", 1024, 24, 16, "mlp", 304.37, 86.3, 86.5),
    "g": ("giant", 1536, 40, 24, "swiglu", 1136.48, 86.5, 87.0),
}

OFFICIAL_BACKBONES: dict[str, OfficialBackbone] = {
    f"dinov2_vit{letter}14{'_reg4' if registers else ''}": OfficialBackbone(
        name=f"dinov2_vit{letter}14{'_reg4' if registers else ''}",
        size=size,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_register_tokens=registers,
        ffn=ffn,
        params_millions=round(params + registers * dim / 1e6, 2),
        imagenet_linear_top1=top1_reg if registers else top1,
        base_model=f"facebook/dinov2-{'with-registers-' if registers else ''}{size}",
    )
    for letter, (size, dim, depth, heads, ffn, params, top1, top1_reg) in _SIZES.items()
    for registers in (0, 4)
}


def official_backbone(name: str) -> OfficialBackbone:
    """The registry row of the official backbone `name` (e.g. "dinov2_vitb14_reg4"), or KeyError naming the choices."""
    try:
        return OFFICIAL_BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown official DINOv2 backbone {name!r}; known: {', '.join(OFFICIAL_BACKBONES)}") from None


def head_kind_of_file(file_name: str) -> str | None:
    """The head kind ("linear" or "linear4") of an official head file name, None for any other file."""
    for kind in HEADS:
        if file_name.endswith(f"_{kind}_head.pth"):
            return kind
    return None


def identify_source_file(file_name: str) -> tuple[OfficialBackbone, str | None] | None:
    """(backbone, head kind or None) for an official DINOv2 file name, None for any other file."""
    for backbone in OFFICIAL_BACKBONES.values():
        if file_name == backbone.pretrain_file:
            return backbone, None
        for kind in HEADS:
            if file_name == backbone.head_file(kind):
                return backbone, kind
    return None
