"""The official DINOv2 and DINOv3 hub backbones, as declarative tables of one shared row shape.

Importable without torch or transformers, so converters can use it to name files and repositories.
DINOv2 numbers come from /work/shared/reference (DINOv2 model table and the registers paper); DINOv3 rows from
facebookresearch/dinov3 (`dinov3/hub/backbones.py`, README.md, MODEL_CARD.md).
"""

from dataclasses import dataclass

DINOV2_REPO_URL = "https://github.com/facebookresearch/dinov2"
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2"  # where DINOv2's hubconf downloads the weights from
IMAGENET_DATASET = "ILSVRC/imagenet-1k"
ADE20K_DATASET = "scene_parse_150"  # ADE20K's 150-class scene-parsing benchmark on the Hub

DINOV3_REPO_URL = "https://github.com/facebookresearch/dinov3"
DINOV3_PAPER_URL = "https://arxiv.org/abs/2508.10104"
# The hub builders' base URL; the files themselves are served only through the signed links Meta e-mails after the
# licence is accepted (https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/).
DINOV3_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov3"
DINOV3_LICENSE = "dinov3-license"  # Provenance.license and the card's license_name
DINOV3_LICENSE_TITLE = "DINOv3 License"
DINOV3_LICENSE_URL = "https://ai.meta.com/resources/models-and-libraries/dinov3-license/"
# Licences the Hub has no identifier for: the card says `license: other` with this name and link.
OTHER_LICENSES = {DINOV3_LICENSE: (DINOV3_LICENSE_TITLE, DINOV3_LICENSE_URL)}
DINOV3_WEIGHT_SETS = {
    "LVD1689M": "LVD-1689M (1,689M curated web images)",
    "SAT493M": "SAT-493M (493M 512x512 satellite images, Maxar RGB at 0.6 m)",
}


@dataclass(frozen=True)
class PublishedResult:
    """A number the model's authors published (never re-measured by ViTReg)."""

    benchmark: str  # "ImageNet-1k top-1, linear evaluation"
    value: float
    unit: str  # "%" or "" (a mean of scores)
    source: str  # where it was published, as the card's Results table says it
    # model-index (Hub metadata) fields; None keeps the number out of model-index (no Hub dataset / metric for it)
    task_type: str | None = None
    dataset_type: str | None = None
    dataset_name: str | None = None
    metric_type: str | None = None


@dataclass(frozen=True)
class OfficialViT:
    """What every official ViT row says, DINOv2's or DINOv3's: its name, shape, size and Hub twin."""

    name: str  # the registry key, e.g. "dinov2_vitb14_reg4", "dinov3_vitl16_sat493m"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_register_tokens: int
    ffn: str  # "mlp" | "swiglu"
    params_millions: float  # backbone parameters, registers and mask token included
    base_model: str  # the same weights as ported by Meta to transformers on the Hub

    @property
    def family(self) -> str:
        """The release the row belongs to: "dinov2" or "dinov3"."""
        return self.name.split("_", 1)[0]

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def repo_name(self) -> str:
        """Hub repository name of the converted backbone (also the folder name a batch conversion writes)."""
        return self.name.replace("_", "-")


@dataclass(frozen=True)
class OfficialHead:
    """An ImageNet-1k linear head DINOv2 ships for every backbone."""

    kind: str  # "linear" | "linear4": the file suffix
    num_layers: int  # CLS tokens of the last n blocks it reads (ViTRegConfig.classifier_num_layers)
    description: str


@dataclass(frozen=True)
class OfficialBackbone(OfficialViT):
    """One of the eight DINOv2 hub backbones (`torch.hub.load("facebookresearch/dinov2", name)`)."""

    size: str  # "small" | "base" | "large" | "giant"
    imagenet_linear_top1: float  # published ImageNet-1k linear evaluation top-1 (%)

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

    @property
    def results(self) -> tuple[PublishedResult, ...]:
        """The published numbers of this backbone."""
        return (
            PublishedResult(
                benchmark="ImageNet-1k top-1, linear evaluation",
                value=self.imagenet_linear_top1,
                unit="%",
                source=f"published in the DINOv2 model table ({DINOV2_REPO_URL}), one number per backbone (the table "
                "does not say which of the 1-layer and 4-layer heads reaches it); not re-measured by ViTReg",
                task_type="image-classification",
                dataset_type=IMAGENET_DATASET,
                dataset_name="ImageNet-1k",
                metric_type="accuracy",
            ),
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


@dataclass(frozen=True)
class Dinov3Backbone(OfficialViT):
    """One DINOv3 ViT hub backbone with one set of weights (`torch.hub.load("facebookresearch/dinov3", hub_name,
    weights=...)`). Every one has patch 16, 4 registers ("storage tokens"), RoPE base 100, LayerScale 1e-5 and
    LayerNorm eps 1e-5."""

    hub_name: str  # the torch.hub entry point, e.g. "dinov3_vitl16"
    size: str  # "S" | "S+" | "B" | "L" | "H+" | "7B"
    weights: str  # "LVD1689M" | "SAT493M"
    file_hash: str  # the 8 hex digits the builder appends to the file name
    ffn_ratio: float
    swiglu_align_to: int  # the SwiGLU width is rounded up to a multiple of this (the builders' "swiglu" / "swiglu64")
    qkv_bias: bool
    untie_global_and_local_cls_norm: bool  # the file carries a `local_cls_norm` (training-only)
    published_params_millions: float  # the README's rounded count
    distilled: bool  # distilled from the ViT-7B of the same weights (the 7B itself is trained from scratch)
    results: tuple[PublishedResult, ...]  # from MODEL_CARD.md; which benchmarks depends on the weights

    patch_size = 16
    image_size = 224  # the builders' img_size
    rope_theta = 100.0
    rope_rescale_coords = 2.0  # the builders' train-time coordinate rescaling
    layerscale_value = 1e-5
    layer_norm_eps = 1e-5

    @property
    def pretrain_file(self) -> str:
        """File name of the official backbone weights, e.g. "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"."""
        return f"{self.hub_name}_pretrain_{self.weights.lower()}-{self.file_hash}.pth"

    @property
    def pretrain_url(self) -> str:
        """The URL the hub builder loads (it needs the signed query Meta's download e-mail adds)."""
        return f"{DINOV3_WEIGHTS_URL}/{self.hub_name}/{self.pretrain_file}"

    @property
    def arch(self) -> str:
        """Readable architecture, e.g. "ViT-S+/16 with 4 registers"."""
        return f"ViT-{self.size}/{self.patch_size} with {self.num_register_tokens} registers"

    @property
    def mlp_hidden_size(self) -> int:
        """Width of the MLP (or of each SwiGLU branch), as DINOv3's Mlp / SwiGLUFFN compute it."""
        hidden = int(self.hidden_size * self.ffn_ratio)
        if self.ffn == "swiglu":
            hidden = int(hidden * 2 / 3)
            hidden += -hidden % self.swiglu_align_to
        return hidden

    def count_parameters(self) -> int:
        """Parameters of the official backbone, from its shapes (buffers such as RoPE periods not counted)."""
        dim, hidden = self.hidden_size, self.mlp_hidden_size
        attention = 3 * dim * dim + 3 * dim * self.qkv_bias + dim * dim + dim  # qkv, proj
        mlp = (2 if self.ffn == "swiglu" else 1) * (dim * hidden + hidden) + hidden * dim + dim  # fc1 or w1, w2; out
        block = attention + mlp + 4 * dim + 2 * dim  # norm1 and norm2; ls1 and ls2
        patch_embed = 3 * self.patch_size**2 * dim + dim
        tokens = (1 + self.num_register_tokens + 1) * dim  # cls, storage, mask
        norms = 2 * dim * (1 + self.untie_global_and_local_cls_norm)  # norm (+ local_cls_norm)
        return patch_embed + tokens + self.num_hidden_layers * block + norms

    def config_fields(self) -> dict:
        """`ViTRegConfig` keyword arguments of this backbone (plain data: converters build the config)."""
        return dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            mlp_ratio=self.ffn_ratio,
            use_swiglu_ffn=self.ffn == "swiglu",
            swiglu_align_to=self.swiglu_align_to,
            num_register_tokens=self.num_register_tokens,
            image_size=self.image_size,
            patch_size=self.patch_size,
            position_embedding_type="rope",
            rope_theta=self.rope_theta,
            rope_normalize_coords="separate",
            rope_rescale_coords=self.rope_rescale_coords,
            qkv_bias=self.qkv_bias,
            mask_k_bias=self.qkv_bias,  # the builders all say mask_k_bias=True; without a qkv bias there is none
            untie_global_and_local_cls_norm=self.untie_global_and_local_cls_norm,
            layerscale_value=self.layerscale_value,
            layer_norm_eps=self.layer_norm_eps,
            use_mask_token=True,  # every official backbone carries its iBOT mask token
        )

    @property
    def description(self) -> str:
        """One paragraph on what this backbone is."""
        training = "distilled from DINOv3 ViT-7B/16" if self.distilled else "trained from scratch"
        return (
            f"DINOv3 {self.arch} ({self.params_millions:.1f}M parameters), a self-supervised image backbone by Meta "
            f"AI {training} on {DINOV3_WEIGHT_SETS[self.weights]}. Its registers are DINOv3's storage tokens, and "
            "rotary position embeddings (RoPE) replace learned ones, so any image whose sides are multiples of "
            f"{self.patch_size} px works without interpolation."
        )


_MODEL_CARD = f"the DINOv3 model card ({DINOV3_REPO_URL}/blob/main/MODEL_CARD.md)"
_NOT_REMEASURED = "protocol in the DINOv3 paper; not re-measured by ViTReg"


def _web_results(in_real: float, ade20k: float) -> tuple[PublishedResult, ...]:
    """The LVD-1689M ViTs' IN-ReaL and ADE20k numbers, as MODEL_CARD.md publishes them."""
    return (
        PublishedResult(
            "ImageNet-ReaL top-1 (IN-ReaL)", in_real, "%", f"published in {_MODEL_CARD}; {_NOT_REMEASURED}",
            "image-classification", IMAGENET_DATASET, "ImageNet-ReaL", "accuracy",
        ),
        PublishedResult(
            "ADE20k semantic segmentation mIoU", ade20k, "%", f"published in {_MODEL_CARD}; {_NOT_REMEASURED}",
            "image-segmentation", ADE20K_DATASET, "ADE20k", "mean_iou",
        ),
    )  # fmt: skip


def _satellite_results(classification: float, segmentation: float) -> tuple[PublishedResult, ...]:
    """The SAT-493M ViTs' GEO-Bench means: MODEL_CARD.md gives no IN-ReaL or ADE20k number for these weights."""
    source = f"published in {_MODEL_CARD}, mean over its 6 tasks; {_NOT_REMEASURED}"
    return (
        PublishedResult("GEO-Bench classification, mean of 6 tasks", classification, "", source),
        PublishedResult("GEO-Bench segmentation, mean of 6 tasks", segmentation, "", source),
    )


# One row per (hub builder, weights) that Meta released. Hashes from the builders; published parameter counts from
# the README (21M, 29M, 86M, 300M, 840M, 6,716M: rounded, the S/16 one down); ffn ratios and SwiGLU alignment from
# the builders (7B: "swiglu64", no qkv bias). ViT-L/16 SAT-493M and both 7Bs untie the local-crop CLS norm.
_DINOV3_SIZES = {
    # hub name: (size, dim, depth, heads, ffn, ffn ratio, swiglu align, qkv bias, published params (M))
    "dinov3_vits16": ("S", 384, 12, 6, "mlp", 4.0, 8, True, 21),
    "dinov3_vits16plus": ("S+", 384, 12, 6, "swiglu", 6.0, 8, True, 29),
    "dinov3_vitb16": ("B", 768, 12, 12, "mlp", 4.0, 8, True, 86),
    "dinov3_vitl16": ("L", 1024, 24, 16, "mlp", 4.0, 8, True, 300),
    "dinov3_vith16plus": ("H+", 1280, 32, 20, "swiglu", 6.0, 8, True, 840),
    "dinov3_vit7b16": ("7B", 4096, 40, 32, "swiglu", 3.0, 64, False, 6716),
}
_DINOV3_RELEASES = {
    # (hub name, weights): (file hash, untie_global_and_local_cls_norm, published results)
    ("dinov3_vits16", "LVD1689M"): ("08c60483", False, _web_results(87.0, 47.0)),
    ("dinov3_vits16plus", "LVD1689M"): ("4057cbaa", False, _web_results(88.0, 48.8)),
    ("dinov3_vitb16", "LVD1689M"): ("73cec8be", False, _web_results(89.3, 51.8)),
    ("dinov3_vitl16", "LVD1689M"): ("8aa4cbdd", False, _web_results(90.2, 54.9)),
    ("dinov3_vith16plus", "LVD1689M"): ("7c1da9a5", False, _web_results(90.3, 54.8)),
    ("dinov3_vit7b16", "LVD1689M"): ("a955f4ea", True, _web_results(90.4, 55.9)),
    ("dinov3_vitl16", "SAT493M"): ("eadcf0ff", True, _satellite_results(79.6, 74.5)),
    ("dinov3_vit7b16", "SAT493M"): ("a6675841", True, _satellite_results(81.1, 75.0)),
}


def _dinov3_row(hub_name: str, weights: str) -> Dinov3Backbone:
    size, dim, depth, heads, ffn, ratio, align, qkv_bias, published = _DINOV3_SIZES[hub_name]
    file_hash, untie_local, results = _DINOV3_RELEASES[hub_name, weights]
    fields = dict(
        name=f"{hub_name}_{weights.lower()}",
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_register_tokens=4,
        ffn=ffn,
        params_millions=0.0,  # computed below, from the shapes
        base_model=f"facebook/{hub_name.replace('_', '-')}-pretrain-{weights.lower()}",
        hub_name=hub_name,
        size=size,
        weights=weights,
        file_hash=file_hash,
        ffn_ratio=ratio,
        swiglu_align_to=align,
        qkv_bias=qkv_bias,
        untie_global_and_local_cls_norm=untie_local,
        published_params_millions=published,
        distilled=size != "7B",
        results=results,
    )
    row = Dinov3Backbone(**fields)
    return Dinov3Backbone(**{**fields, "params_millions": round(row.count_parameters() / 1e6, 2)})


# Keys: "<hub name>_<weights>", e.g. "dinov3_vitb16_lvd1689m"; the repo name is Meta's transformers port's.
DINOV3_BACKBONES: dict[str, Dinov3Backbone] = {
    row.name: row for row in (_dinov3_row(hub_name, weights) for hub_name, weights in _DINOV3_RELEASES)
}


def official_backbone(name: str) -> OfficialBackbone:
    """The registry row of the official backbone `name` (e.g. "dinov2_vitb14_reg4"), or KeyError naming the choices."""
    try:
        return OFFICIAL_BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown official DINOv2 backbone {name!r}; known: {', '.join(OFFICIAL_BACKBONES)}") from None


def dinov3_backbone(name: str) -> Dinov3Backbone:
    """The registry row of the DINOv3 backbone `name` (e.g. "dinov3_vitb16_lvd1689m"), or KeyError naming them all."""
    try:
        return DINOV3_BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown official DINOv3 backbone {name!r}; known: {', '.join(DINOV3_BACKBONES)}") from None


def official_row(name: str) -> OfficialBackbone | Dinov3Backbone:
    """The row of any official backbone, DINOv2 or DINOv3, by its registry name; KeyError naming the choices."""
    return dinov3_backbone(name) if name.startswith("dinov3") else official_backbone(name)


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


def identify_dinov3_file(file_name: str) -> Dinov3Backbone | None:
    """The DINOv3 row of an official file name (with its hash, or with the hash left out), None for any other."""
    for row in DINOV3_BACKBONES.values():
        if file_name in (row.pretrain_file, row.pretrain_file.replace(f"-{row.file_hash}", "")):
            return row
    return None
