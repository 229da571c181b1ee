"""Pure converters between checkpoint layouts and ViTReg's parameter names, dispatched by sniffing the keys.

Every converter maps a state dict (already free of containers and prefixes) to ViTReg names plus the
`ViTRegConfig` its shapes describe. Renames keep the source tensors (memory-mapped, no copy); the transformers
layout's split q/k/v become `Concat`s of them, concatenated only when a model is built in memory.
"""

import math
import re
from dataclasses import dataclass, field

import torch

from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegConfig

from .architectures import INTERPOLATIONS, interpolation, match_official, transformers_interpolation
from .heads import imagenet_labels
from .streaming import Concat

ANCHORS = (
    "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.weight",  # transformers' DINOv3ViT (a bare conv)
)
FORMATS = (
    "dinov2-hub",
    "dinov2-train",
    "timm",
    "transformers",
    "vitreg",
    "dinov3-hub",
    "dinov3-transformers",
    "dinov3-timm",
)

# (source pattern, ViTReg name): DINOv2's and timm's names differ only in reg_token and the SwiGLU names.
VIT_RULES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"pos_embed", r"embeddings.position_embeddings"),
    (r"(?:register_tokens|reg_token)", r"embeddings.register_tokens"),
    (r"mask_token", r"embeddings.mask_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layer.\1.norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", r"encoder.layer.\1.attention.\2.\3"),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"blocks\.(\d+)\.mlp\.w12\.(weight|bias)", r"encoder.layer.\1.mlp.weights_in.\2"),
    (r"blocks\.(\d+)\.mlp\.w3\.(weight|bias)", r"encoder.layer.\1.mlp.weights_out.\2"),
    (r"(?:fc_norm|norm)\.(weight|bias)", r"layernorm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]

# transformers Dinov2 / Dinov2WithRegisters, on disk (query/key/value, output.dense) and in memory (q_proj, ...).
# Split projections get a temporary `.q` / `.k` / `.v` / `.gate` / `.up` part name and are fused afterwards.
_LAYER, _TO_LAYER = r"encoder\.layer\.(\d+)\.", r"encoder.layer.\1."
TRANSFORMERS_RULES = [
    (r"embeddings\.(cls_token|mask_token|register_tokens|position_embeddings)", r"embeddings.\1"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_LAYER + r"norm([12])\.(weight|bias)", _TO_LAYER + r"norm\2.\3"),
    (_LAYER + r"attention\.(?:attention\.)?(?:query|q_proj)\.(weight|bias)", _TO_LAYER + r"attention.qkv.q.\2"),
    (_LAYER + r"attention\.(?:attention\.)?(?:key|k_proj)\.(weight|bias)", _TO_LAYER + r"attention.qkv.k.\2"),
    (_LAYER + r"attention\.(?:attention\.)?(?:value|v_proj)\.(weight|bias)", _TO_LAYER + r"attention.qkv.v.\2"),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", _TO_LAYER + r"attention.proj.\2"),
    (_LAYER + r"layer_scale([12])\.lambda1", _TO_LAYER + r"layer_scale\2.lambda1"),
    (_LAYER + r"mlp\.(fc1|fc2|weights_in|weights_out)\.(weight|bias)", _TO_LAYER + r"mlp.\2.\3"),
    (_LAYER + r"mlp\.gate_proj\.(weight|bias)", _TO_LAYER + r"mlp.weights_in.gate.\2"),
    (_LAYER + r"mlp\.up_proj\.(weight|bias)", _TO_LAYER + r"mlp.weights_in.up.\2"),
    (_LAYER + r"mlp\.down_proj\.(weight|bias)", _TO_LAYER + r"mlp.weights_out.\2"),
    (r"layernorm\.(weight|bias)", r"layernorm.\1"),
]
FUSED_PARTS = {"attention.qkv": ("q", "k", "v"), "mlp.weights_in": ("gate", "up")}

# ViTReg name -> official DINOv2 name, for the way back.
DINOV2_EXPORT_RULES = [
    (r"embeddings\.cls_token", r"cls_token"),
    (r"embeddings\.position_embeddings", r"pos_embed"),
    (r"embeddings\.register_tokens", r"register_tokens"),
    (r"embeddings\.mask_token", r"mask_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layer\.(\d+)\.attention\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.w12.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
DINOV2_KEY_ORDER = ("cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed", "blocks", "norm")
DINOV2_BLOCK_ORDER = (
    "norm1",
    "attn.qkv",
    "attn.proj",
    "ls1",
    "norm2",
    "mlp.fc1",
    "mlp.w12",
    "mlp.fc2",
    "mlp.w3",
    "ls2",
)


@dataclass
class Conversion:
    """A converted state dict (ViTReg names; `classifier.*` when the source carries a usable head) and its config."""

    config: ViTRegConfig
    state_dict: dict[str, torch.Tensor]
    source_format: str
    notes: list[str] = field(default_factory=list)
    source_names: dict[str, str] = field(default_factory=dict)  # ViTReg name -> the source's name, for messages
    guessed_heads: bool = False  # the head count is not in the source: width / 64 (a note says so)


def rename(
    state_dict: dict[str, torch.Tensor], rules: list[tuple[str, str]], names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Apply the first matching `(pattern, replacement)` rule to every key; refuse keys no rule knows.

    `names`, when given, receives new name -> old name."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                renamed[pattern.sub(replacement, key)] = tensor
                if names is not None:
                    names[pattern.sub(replacement, key)] = key
                break
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"unknown keys for this layout: {_listing(unknown)}")
    return renamed


def _listing(keys: list[str], limit: int = 3) -> str:
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def split_prefix(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """The backbone's tensors without their prefix (`module.backbone.`, `teacher.`, `dinov2.`, ...), the prefix, and
    the keys outside it (heads beside the backbone)."""
    prefixes = [key[: -len(anchor)] for key in tensors for anchor in ANCHORS if key.endswith(anchor)]
    prefixes = [prefix for prefix in prefixes if prefix == "" or prefix.endswith(".")]
    if not prefixes:
        raise UserError(
            "not a Vision Transformer checkpoint: it has no patch embedding "
            f"({' / '.join(ANCHORS)}); its keys start with {_listing(list(tensors))}"
        )
    # A training checkpoint may hold student and teacher: the teacher is the model DINOv2 evaluates.
    prefix = min(prefixes, key=lambda p: ("student" in p, len(p)))
    inside = {key[len(prefix) :]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    outside = [key for key in tensors if not key.startswith(prefix)]
    return inside, prefix, outside


def unchunk_blocks(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """DINOv2's chunked block names `blocks.<chunk>.<index>.*` -> `blocks.<index>.*` (the index is global)."""
    chunked = re.compile(r"blocks\.\d+\.(\d+)\.")
    if not any(chunked.match(key) for key in state_dict):
        return state_dict, False
    return {chunked.sub(r"blocks.\1.", key, count=1): value for key, value in state_dict.items()}, True


def sniff_format(state_dict: dict[str, torch.Tensor], flattened: bool) -> str:
    """Which layout a prefix-free state dict is in; `flattened` when containers, prefixes or chunks were removed."""
    if "embeddings.patch_embeddings.projection.weight" in state_dict:
        return "vitreg" if any(key.endswith("attention.qkv.weight") for key in state_dict) else "transformers"
    if "embeddings.patch_embeddings.weight" in state_dict:
        return "dinov3-transformers"
    if "rope_embed.periods" in state_dict or "storage_tokens" in state_dict:
        return "dinov3-hub"
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        return "dinov2-train" if flattened else "dinov2-hub"
    if "pos_embed" not in state_dict and any(key.endswith(".gamma_1") for key in state_dict):
        return "dinov3-timm"  # timm's Eva names (gamma_1) and RoPE instead of a position embedding
    return "timm"  # timm's DINOv2 converter drops mask_token and renames register_tokens to reg_token


def _tensor(state_dict: dict[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in state_dict:
        raise UserError(f"missing key {key}")
    tensor = state_dict[key]
    if tensor.ndim != ndim:
        raise UserError(f"{key}: expected {ndim} dimensions, got shape {list(tensor.shape)}")
    return tensor


def _depth(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    indices = {int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))}
    if not indices:
        raise UserError("no transformer blocks found")
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise UserError(f"missing transformer block(s) {missing[:5]} of {max(indices) + 1}")
    return max(indices) + 1


def _heads(dim: int, num_heads: int | None) -> int:
    if num_heads is None:
        if dim % 64:
            raise UserError(f"width {dim} is not a multiple of the head dimension 64: pass --num-heads")
        return dim // 64
    if num_heads <= 0 or dim % num_heads:
        raise UserError(f"--num-heads {num_heads} does not divide the width {dim}")
    return num_heads


def guessed_heads_note(config: ViTRegConfig) -> str:
    """What to tell the user when the head count was not in the checkpoint but guessed from its width."""
    width, heads = config.hidden_size, config.num_attention_heads
    return f"guessed num_attention_heads={heads} from width {width} (DINOv2's width/64); pass --num-heads if wrong"


def check_interpolation(name: str) -> None:
    """Refuse an `--interpolation` other than `source` or `dinov2`."""
    if name not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {name!r}; choose one of {', '.join(INTERPOLATIONS)}")


def _grid(num_positions: int, key: str) -> int:
    grid = math.isqrt(max(num_positions, 0))
    if grid == 0 or grid * grid != num_positions:
        raise UserError(f"{key}: {num_positions} patch positions do not form a square grid")
    return grid


def _make_config(**fields) -> ViTRegConfig:
    try:
        return ViTRegConfig(**fields)
    except ValueError as error:
        raise UserError(f"the checkpoint describes no valid ViTReg model: {error}") from None


def _mlp_shape(state_dict: dict[str, torch.Tensor], block: str, names: tuple[str, str]) -> tuple[int, bool]:
    """`(hidden width, SwiGLU?)` of a block's MLP from its two projections (a packed SwiGLU has 2x the rows)."""
    rows = _tensor(state_dict, f"{block}.{names[0]}.weight", 2).shape[0]
    hidden = _tensor(state_dict, f"{block}.{names[1]}.weight", 2).shape[1]
    if rows not in (hidden, 2 * hidden):
        raise UserError(f"{block}: MLP projections of widths {rows} and {hidden} do not fit together")
    return hidden, rows == 2 * hidden


def convert_vit(
    state_dict: dict[str, torch.Tensor],
    source_format: str,
    num_heads: int | None = None,
    interpolation_from: str = "source",
) -> Conversion:
    """DINOv2 (hub or training) or timm layout -> ViTReg, with the architecture read off the shapes.

    `num_heads`: the head count (the checkpoint holds none: without it, width / 64, as every DINOv2, noted as a
    guess unless the shapes are an official model's); `interpolation_from`: `source` (DINOv2's for DINOv2 files,
    timm's own for timm's) or `dinov2` (DINOv2's official algorithm for any source).
    """
    check_interpolation(interpolation_from)
    patch = _tensor(state_dict, "patch_embed.proj.weight", 4)  # [D, C, p, p]
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    if patch.shape[2] != patch.shape[3]:
        raise UserError(f"patch_embed.proj.weight: non-square patches {list(patch.shape[2:])} are not supported")
    depth = _depth(state_dict, r"blocks\.(\d+)\.")
    packed_swiglu = "blocks.0.mlp.w12.weight" in state_dict
    mlp_names = ("mlp.w12", "mlp.w3") if packed_swiglu else ("mlp.fc1", "mlp.fc2")
    hidden, swiglu = _mlp_shape(state_dict, "blocks.0", mlp_names)
    registers = state_dict.get("register_tokens", state_dict.get("reg_token"))
    num_registers = registers.shape[1] if registers is not None else 0
    use_cls = "cls_token" in state_dict
    num_positions = _tensor(state_dict, "pos_embed", 3).shape[1]
    if source_format.startswith("dinov2"):
        if not use_cls:
            raise UserError("missing key cls_token")
        cls_position = True
        family = interpolation(num_registers)
    else:
        # timm folds the CLS position into the token when pos_embed has no CLS entry (no_embed_class).
        cls_position = use_cls and num_positions > 1 and math.isqrt(num_positions - 1) ** 2 == num_positions - 1
        # timm's DINOv2 ViTs without registers keep the official 0.1-offset interpolation; all others use timm's own.
        dinov2_like = num_registers == 0 and use_cls and patch_size == 14
        family = interpolation(0) if dinov2_like else {"interpolate_antialias": True, "interpolate_offset": 0.0}
    if interpolation_from == "dinov2":
        family = interpolation(num_registers)
    grid = _grid(num_positions - int(cls_position), "pos_embed")
    fc_norm = "fc_norm.weight" in state_dict
    config = _make_config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=_heads(dim, num_heads),
        intermediate_size=hidden,
        use_swiglu_ffn=swiglu,
        num_channels=channels,
        patch_size=patch_size,
        image_size=grid * patch_size,
        num_register_tokens=num_registers,
        layerscale_value=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=f"blocks.0.{mlp_names[0]}.bias" in state_dict,
        layer_norm_eps=1e-6,
        use_cls_token=use_cls,
        cls_token_position_embedding=cls_position,
        use_mask_token="mask_token" in state_dict,
        use_fc_norm=fc_norm,
        pooling="cls" if use_cls and not fc_norm else "mean",
        **family,
    )
    names = {}
    converted = rename(state_dict, VIT_RULES, names)
    if swiglu and not packed_swiglu:  # timm's packed SwiGLU keeps the fc1/fc2 names

        def swiglu_name(key: str) -> str:
            return key.replace(".mlp.fc1.", ".mlp.weights_in.").replace(".mlp.fc2.", ".mlp.weights_out.")

        converted = {swiglu_name(key): value for key, value in converted.items()}
        names = {swiglu_name(key): value for key, value in names.items()}
    notes = []
    guessed = num_heads is None and (source_format == "timm" or match_official(config) is None)
    if guessed:
        notes.append(guessed_heads_note(config))
    if "classifier.weight" in converted and fc_norm:
        # timm's head on the fc-normed mean patch token is exactly ViTReg's classifier with use_fc_norm.
        config.num_labels = converted["classifier.weight"].shape[0]
        labels = imagenet_labels(config.num_labels)
        if labels:
            config.id2label, config.label2id = labels, {name: index for index, name in labels.items()}
    if "classifier.weight" in converted and not fc_norm:
        # timm's token-pooled head reads the CLS token alone; ViTReg's linear head reads CLS + mean patch.
        converted.pop("classifier.weight")
        converted.pop("classifier.bias", None)
        notes.append("dropped timm's CLS-token classifier head (ViTReg's head also reads the mean patch token)")
    return Conversion(config, converted, source_format, notes, names, guessed_heads=guessed)


def _fuse(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | Concat]:
    """Join temporary part names (`...qkv.q.weight`, `.k.`, `.v.`) into one `Concat` (rows in part order, no copy)."""
    fused, groups = {}, {}
    part_pattern = re.compile(r"(.*\.(?:" + "|".join(map(re.escape, FUSED_PARTS)) + r"))\.(\w+)\.(weight|bias)")
    for key, tensor in state_dict.items():
        match = part_pattern.fullmatch(key)
        if match is None:
            fused[key] = tensor
        else:
            groups.setdefault(f"{match.group(1)}.{match.group(3)}", {})[match.group(2)] = tensor
    for key, parts in groups.items():
        order = next(order for name, order in FUSED_PARTS.items() if f".{name}." in f"{key}.")
        missing = [part for part in order if part not in parts]
        if missing:
            raise UserError(f"{key}: missing the {'/'.join(missing)} projection(s)")
        try:
            fused[key] = Concat(parts[part] for part in order)
        except ValueError as error:
            raise UserError(f"{key}: {error}") from None
    return fused


def convert_transformers(
    state_dict: dict[str, torch.Tensor],
    folder_config: dict | None,
    num_heads: int | None = None,
    interpolation_from: str = "source",
) -> Conversion:
    """transformers Dinov2 / Dinov2WithRegisters (model folder) -> ViTReg.

    `interpolation_from`: `source` resizes positions as transformers' model does (the folder keeps its function at
    every size), `dinov2` as DINOv2's official code (they differ only without registers: the 0.1 offset).
    """
    check_interpolation(interpolation_from)
    folder_config = folder_config or {}
    heads = folder_config.get("num_attention_heads")
    if num_heads is not None and heads is not None and num_heads != heads:
        raise UserError(f"--num-heads {num_heads} contradicts config.json ({heads} heads)")
    names = {}
    converted = _fuse(rename(state_dict, TRANSFORMERS_RULES, names))
    patch = _tensor(converted, "embeddings.patch_embeddings.projection.weight", 4)
    dim, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    depth = _depth(converted, r"encoder\.layer\.(\d+)\.")
    block = "encoder.layer.0"
    packed_swiglu = f"{block}.mlp.weights_in.weight" in converted
    mlp_names = ("mlp.weights_in", "mlp.weights_out") if packed_swiglu else ("mlp.fc1", "mlp.fc2")
    hidden, swiglu = _mlp_shape(converted, block, mlp_names)
    registers = converted.get("embeddings.register_tokens")
    num_registers = registers.shape[1] if registers is not None else 0
    grid = _grid(_tensor(converted, "embeddings.position_embeddings", 3).shape[1] - 1, "position_embeddings")
    config = _make_config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=_heads(dim, num_heads) if num_heads else heads or _heads(dim, None),
        intermediate_size=hidden,
        use_swiglu_ffn=swiglu,
        hidden_act=folder_config.get("hidden_act", "gelu"),
        layer_norm_eps=folder_config.get("layer_norm_eps", 1e-6),
        num_channels=channels,
        patch_size=patch_size,
        image_size=grid * patch_size,
        num_register_tokens=num_registers,
        layerscale_value=1.0 if f"{block}.layer_scale1.lambda1" in converted else None,
        qkv_bias=f"{block}.attention.qkv.bias" in converted,
        use_mask_token="embeddings.mask_token" in converted,
        **(interpolation if interpolation_from == "dinov2" else transformers_interpolation)(num_registers),
    )
    notes = []
    guessed = num_heads is None and heads is None
    if guessed:
        notes.append(guessed_heads_note(config))
    if not num_registers and interpolation_from == "dinov2":
        notes.append(
            "interpolation: DINOv2's official 0.1-offset path: off the native size the tokens differ from "
            "transformers' Dinov2Model, which resizes without it (--interpolation source keeps transformers')"
        )
    elif not num_registers:
        notes.append(
            "interpolation: transformers' (bicubic to the target size, no offset), as the source computes; DINOv2's "
            "official code adds a 0.1 offset (--interpolation dinov2)"
        )
    return Conversion(config, converted, "transformers", notes, names, guessed_heads=guessed)


def to_dinov2(state_dict: dict[str, torch.Tensor], config: ViTRegConfig) -> dict[str, torch.Tensor]:
    """ViTReg backbone weights -> the official DINOv2 hub layout (what `DinoVisionTransformer` loads strictly)."""
    if not config.use_cls_token or config.use_fc_norm:
        raise UserError("the official DINOv2 layout needs a CLS token and a final norm on every token")
    exported = rename(state_dict, DINOV2_EXPORT_RULES)
    if not config.cls_token_position_embedding:
        # timm folded the CLS position into the token: a zero CLS position entry is the same model.
        pos = exported["pos_embed"]
        exported["pos_embed"] = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), dim=1)  # [1, 1 + g*g, D]
    if "mask_token" not in exported:
        exported["mask_token"] = torch.zeros(1, config.hidden_size, dtype=exported["cls_token"].dtype)

    def rank(key: str) -> tuple[int, int, int, bool]:
        parts = key.split(".")
        top = DINOV2_KEY_ORDER.index(parts[0] if parts[0] in DINOV2_KEY_ORDER else "norm")
        block = int(parts[1]) if parts[0] == "blocks" else 0
        inner = ".".join(parts[2:-1]) if parts[0] == "blocks" else ""
        within = DINOV2_BLOCK_ORDER.index(inner) if inner in DINOV2_BLOCK_ORDER else 0
        return top, block, within, parts[-1] == "bias"

    return {key: exported[key].contiguous() for key in sorted(exported, key=rank)}
