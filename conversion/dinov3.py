"""DINOv3 ViTs: the official hub layout (shapes, random weights, export) and pure converters from the official, the
transformers (`DINOv3ViTModel`) and the timm (`vit_*_patch16_dinov3*`) layouts to ViTReg's names.

    dinov3_shapes("dinov3_vitl16_sat493m")["blocks.0.attn.qkv.bias_mask"]   # (3072,)
    write_random_dinov3_checkpoint("vitb.pth", "dinov3_vitb16", num_hidden_layers=2)

Each converter renames with a declarative table into ViTReg names, MLPs first as neutral parts (`mlp.gate` / `mlp.fc1`
/ `mlp.fc2`: SwiGLU gate, value or hidden, output) and q/k/v as parts fused afterwards; the architecture is then read
off the shapes, as for DINOv2.
"""

import re
from pathlib import Path

import torch

from vitreg.core.errors import UserError
from vitreg.model_cards.registry import DINOV3_BACKBONES
from vitreg.modeling_vitreg import ViTRegConfig
from vitreg.modeling_vitreg.modeling_vitreg import rope_periods

from .layouts import Conversion, _depth, _fuse, _heads, _make_config, _mlp_shape, _tensor, guessed_heads_note, rename

PERIODS, ROPE_BASE = "rope_embed.periods", 100.0
BIAS_MASK = re.compile(r"blocks\.(\d+)\.attn\.qkv\.bias_mask")
# What every DINOv3 hub builder sets beyond the shapes (`dinov3/hub/backbones.py`); sources may say otherwise.
DINOV3_SETTINGS = dict(
    layer_norm_eps=1e-5, layerscale_value=1e-5, rope_normalize_coords="separate", rope_rescale_coords=2.0
)

_BLOCK, _TO = r"blocks\.(\d+)\.", r"encoder.layer.\1."
# Official `DinoVisionTransformer.state_dict()` names (buffers are read before renaming).
HUB_RULES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"storage_tokens", r"embeddings.register_tokens"),
    (r"mask_token", r"embeddings.mask_token"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_BLOCK + r"norm([12])\.(weight|bias)", _TO + r"norm\2.\3"),
    (_BLOCK + r"attn\.(qkv|proj)\.(weight|bias)", _TO + r"attention.\2.\3"),
    (_BLOCK + r"ls([12])\.gamma", _TO + r"layer_scale\2.lambda1"),
    (_BLOCK + r"mlp\.(fc[12])\.(weight|bias)", _TO + r"mlp.\2.\3"),
    (_BLOCK + r"mlp\.w1\.(weight|bias)", _TO + r"mlp.gate.\2"),
    (_BLOCK + r"mlp\.w2\.(weight|bias)", _TO + r"mlp.fc1.\2"),
    (_BLOCK + r"mlp\.w3\.(weight|bias)", _TO + r"mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
    (r"(cls_norm|local_cls_norm)\.(weight|bias)", r"\1.\2"),
]
# transformers DINOv3ViTModel / DINOv3ViTBackbone, as saved (`layer.N`) and in memory (`model.layer.N`).
_LAYER = r"(?:model\.)?layer\.(\d+)\."
TRANSFORMERS_RULES = [
    (r"embeddings\.(cls_token|mask_token|register_tokens)", r"embeddings.\1"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_LAYER + r"norm([12])\.(weight|bias)", _TO + r"norm\2.\3"),
    (_LAYER + r"attention\.([qkv])_proj\.(weight|bias)", _TO + r"attention.qkv.\2.\3"),
    (_LAYER + r"attention\.o_proj\.(weight|bias)", _TO + r"attention.proj.\2"),
    (_LAYER + r"layer_scale([12])\.lambda1", _TO + r"layer_scale\2.lambda1"),
    (_LAYER + r"mlp\.gate_proj\.(weight|bias)", _TO + r"mlp.gate.\2"),
    (_LAYER + r"mlp\.up_proj\.(weight|bias)", _TO + r"mlp.fc1.\2"),
    (_LAYER + r"mlp\.down_proj\.(weight|bias)", _TO + r"mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
# timm's Eva `*_dinov3*` models (after its checkpoint_filter_fn: no mask token, periods or bias mask).
TIMM_RULES = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"reg_token", r"embeddings.register_tokens"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (_BLOCK + r"norm([12])\.(weight|bias)", _TO + r"norm\2.\3"),
    (_BLOCK + r"attn\.(qkv|proj)\.(weight|bias)", _TO + r"attention.\2.\3"),
    (_BLOCK + r"attn\.([qv])_bias", _TO + r"attention.qkv.\2.bias"),
    (_BLOCK + r"gamma_([12])", _TO + r"layer_scale\2.lambda1"),
    (_BLOCK + r"mlp\.fc1_g\.(weight|bias)", _TO + r"mlp.gate.\2"),
    (_BLOCK + r"mlp\.(?:fc1_x|fc1)\.(weight|bias)", _TO + r"mlp.fc1.\2"),
    (_BLOCK + r"mlp\.fc2\.(weight|bias)", _TO + r"mlp.fc2.\2"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
    (r"head\.(weight|bias)", r"classifier.\1"),
]
# ViTReg -> official, after `weights_in` is split into its `.gate` (w1) and `.up` (w2) halves.
_FROM = r"encoder\.layer\.(\d+)\."
EXPORT_RULES = [
    (r"embeddings\.cls_token", r"cls_token"),
    (r"embeddings\.register_tokens", r"storage_tokens"),
    (r"embeddings\.mask_token", r"mask_token"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_FROM + r"norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_FROM + r"attention\.(qkv|proj)\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_FROM + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_FROM + r"mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (_FROM + r"mlp\.weights_in\.gate\.(weight|bias)", r"blocks.\1.mlp.w1.\2"),
    (_FROM + r"mlp\.weights_in\.up\.(weight|bias)", r"blocks.\1.mlp.w2.\2"),
    (_FROM + r"mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"(cls_norm|local_cls_norm)\.(weight|bias)", r"\1.\2"),
]


# --- The official layout ---------------------------------------------------------------------------------------------


def dinov3_config(name: str, **overrides) -> ViTRegConfig:
    """The ViTReg config of an official DINOv3 backbone (`dinov3_vitb16`: its LVD-1689M weights, or a registry name
    such as `dinov3_vitl16_sat493m`); overrides shrink it for tests and demos."""
    row = DINOV3_BACKBONES.get(name) or DINOV3_BACKBONES.get(f"{name}_lvd1689m")
    if row is None:
        raise UserError(f"unknown DINOv3 backbone {name!r}; known: {', '.join(DINOV3_BACKBONES)}")
    # Every official checkpoint carries a mask token (iBOT's), exported back unchanged.
    return _make_config(**{**row.config_fields(), **overrides})


def official_shapes(config: ViTRegConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> shape of the DINOv3 model `config` describes, in `DinoVisionTransformer.state_dict()` order
    (the module's own parameters, then its submodules'; buffers after parameters)."""
    dim, hidden, patch = config.hidden_size, config.mlp_hidden_size, config.patch_size
    shapes = {"cls_token": (1, 1, dim)}
    if config.num_register_tokens:
        shapes["storage_tokens"] = (1, config.num_register_tokens, dim)
    shapes["mask_token"] = (1, dim)  # the official model always has one
    shapes["patch_embed.proj.weight"] = (dim, config.num_channels, patch, patch)
    shapes["patch_embed.proj.bias"] = (dim,)
    shapes[PERIODS] = (dim // config.num_attention_heads // 4,)
    mlp = {"w1": (hidden, dim), "w2": (hidden, dim), "w3": (dim, hidden)}
    if not config.use_swiglu_ffn:
        mlp = {"fc1": (hidden, dim), "fc2": (dim, hidden)}

    def linear(prefix: str, shape: tuple[int, int], bias: bool) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.weight": shape, **({f"{prefix}.bias": shape[:1]} if bias else {})}

    for block in range(config.num_hidden_layers):
        prefix = f"blocks.{block}"
        shapes.update({f"{prefix}.norm1.weight": (dim,), f"{prefix}.norm1.bias": (dim,)})
        shapes.update(linear(f"{prefix}.attn.qkv", (3 * dim, dim), config.qkv_bias))
        if config.qkv_bias and config.mask_k_bias:
            shapes[f"{prefix}.attn.qkv.bias_mask"] = (3 * dim,)
        shapes.update(linear(f"{prefix}.attn.proj", (dim, dim), config.proj_bias))
        if config.layerscale_value is not None:
            shapes[f"{prefix}.ls1.gamma"] = (dim,)
        shapes.update({f"{prefix}.norm2.weight": (dim,), f"{prefix}.norm2.bias": (dim,)})
        for name, shape in mlp.items():
            shapes.update(linear(f"{prefix}.mlp.{name}", shape, config.ffn_bias))
        if config.layerscale_value is not None:
            shapes[f"{prefix}.ls2.gamma"] = (dim,)
    norms = ["norm"] + ["cls_norm"] * config.untie_cls_and_patch_norms
    norms += ["local_cls_norm"] * config.untie_global_and_local_cls_norm
    for norm in norms:
        shapes.update({f"{norm}.weight": (dim,), f"{norm}.bias": (dim,)})
    return shapes


def dinov3_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Official key -> full-size shape of a DINOv3 hub backbone (`dinov3_vith16plus`, `dinov3_vitl16_sat493m`, ...),
    in the checkpoint's key order, buffers (`rope_embed.periods`, `bias_mask`) included."""
    return official_shapes(dinov3_config(name))


def bias_mask(rows: int) -> torch.Tensor:
    """DINOv3's released `LinearKMaskedBias.bias_mask`: 1 on the query and value thirds, 0 on the key third."""
    mask = torch.ones(rows)
    mask[rows // 3 : 2 * rows // 3] = 0
    return mask


def random_dinov3_state_dict(
    name: str = "dinov3_vits16",
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    num_attention_heads: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights in the official layout of a DINOv3 hub backbone (key names, order, shapes, buffers: periods of
    base 100, `bias_mask` 1|0|1), optionally shrunk (heads default to the width over the official head dimension)."""
    official = dinov3_config(name)
    overrides = {"num_hidden_layers": num_hidden_layers or official.num_hidden_layers}
    if hidden_size:
        head_dim = official.hidden_size // official.num_attention_heads
        heads = num_attention_heads or max(hidden_size // head_dim, 1)
        overrides.update(hidden_size=hidden_size, num_attention_heads=heads)
    elif num_attention_heads:
        overrides["num_attention_heads"] = num_attention_heads
    config = dinov3_config(name, **overrides)
    generator = torch.Generator().manual_seed(seed)

    def value(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        noise = torch.randn(*shape, generator=generator)
        if key == PERIODS:
            return rope_periods(config)
        if key.endswith("bias_mask"):
            return bias_mask(shape[0])
        if key.endswith(".weight") and len(shape) > 1:  # unit-variance outputs keep every block relevant
            return noise * torch.Size(shape[1:]).numel() ** -0.5
        if key.endswith(".weight"):  # LayerNorms
            return 1.0 + 0.1 * noise
        if key.endswith("gamma"):
            return 0.5 + 0.1 * noise
        if key.endswith(".bias") or key == "mask_token":
            return 0.1 * noise
        return noise  # cls_token, storage_tokens

    return {key: value(key, shape) for key, shape in official_shapes(config).items()}


def write_random_dinov3_checkpoint(path: str | Path, name: str = "dinov3_vits16", **overrides) -> Path:
    """Write a random official-layout DINOv3 backbone (`.pth`), e.g. for tests, demos and benchmarks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_dinov3_state_dict(name, **overrides), path)
    return path


# --- Reading ---------------------------------------------------------------------------------------------------------


def rope_settings(periods: torch.Tensor, dim: int) -> tuple[dict, list[str]]:
    """The config fields (heads and RoPE parametrisation) whose periods are the checkpoint's `rope_embed.periods`, and
    notes; UserError naming the key and the reason when no RoPE setting gives them."""
    count = periods.numel()
    if periods.ndim != 1 or count == 0 or dim % (4 * count):
        raise UserError(
            f"{PERIODS}: {count} periods do not fit the width {dim} (a head of dimension d has d / 4 periods)"
        )
    periods = periods.float()
    if not torch.isfinite(periods).all() or (periods <= 0).any():
        raise UserError(f"{PERIODS}: holds non-finite or non-positive periods ({_few(periods)})")
    fields = {"num_attention_heads": dim // (4 * count)}
    candidates = [
        {"rope_theta": ROPE_BASE},
        {"rope_theta": None, "rope_min_period": periods[0].item(), "rope_max_period": periods[-1].item()},
    ]
    for rope in candidates:
        expected = rope_periods(_make_config(hidden_size=dim, position_embedding_type="rope", **fields, **rope))
        if torch.allclose(periods, expected, rtol=1e-5, atol=0):
            return {**fields, **rope}, []
        if torch.equal(periods, expected.bfloat16().float()):
            # The released weights hold bfloat16-rounded periods, and DINOv3's code computes with what it loads.
            note = (
                f"{PERIODS}: rounded to bfloat16, kept as the official code uses them (transformers and timm "
                "recompute them in float32)"
            )
            return {**fields, **rope, "rope_periods_dtype": "bfloat16"}, [note]
    raise UserError(
        f"{PERIODS}: {_few(periods)} match no RoPE setting (neither base {ROPE_BASE:g} nor geometric periods from "
        "the first to the last)"
    )


def _few(values: torch.Tensor) -> str:
    shown = ", ".join(f"{value:.4g}" for value in values[:4].tolist())
    return f"[{shown}{', ...' if values.numel() > 4 else ''}]"


def _check_bias_masks(masks: dict[str, torch.Tensor], depth: int, bias: torch.Tensor | None) -> bool:
    """Whether the blocks mask their key bias (`mask_k_bias`), after checking every `bias_mask` is DINOv3's 1|0|1."""
    if not masks:
        return False
    if bias is None:
        raise UserError(f"{next(iter(masks))}: a bias mask without a qkv bias")
    for block in range(depth):
        key = f"blocks.{block}.attn.qkv.bias_mask"
        if key not in masks:
            raise UserError(f"missing key {key} (the other blocks mask their key bias)")
        mask = masks[key]
        if mask.shape != bias.shape:
            raise UserError(f"{key}: shape {list(mask.shape)}, expected that of the qkv bias {list(bias.shape)}")
        if torch.isnan(mask).any():
            raise UserError(f"{key}: NaN (never initialised: the official model would compute NaN)")
        if not torch.equal(mask.float(), bias_mask(mask.numel())):
            raise UserError(f"{key}: not 1 on the query and value thirds and 0 on the key third ({_few(mask)})")
    return True


def _finish_mlp(state_dict: dict, names: dict) -> tuple[dict, dict]:
    """Neutral MLP part names -> ViTReg's: `mlp.gate` + `mlp.fc1` are a SwiGLU's `weights_in` halves, `fc2` its
    `weights_out`; without a gate `fc1` / `fc2` stay a GELU MLP's."""
    if not any(".mlp.gate." in key for key in state_dict):
        return state_dict, names
    parts = {
        ".mlp.gate.": ".mlp.weights_in.gate.",
        ".mlp.fc1.": ".mlp.weights_in.up.",
        ".mlp.fc2.": ".mlp.weights_out.",
    }

    def swiglu_name(key: str) -> str:
        for old, new in parts.items():
            key = key.replace(old, new)
        return key

    return {swiglu_name(k): v for k, v in state_dict.items()}, {swiglu_name(k): v for k, v in names.items()}


def _fused_names(names: dict[str, str]) -> dict[str, str]:
    """Source names of fused tensors too (`qkv.weight` <- `q_proj.weight + k_proj.weight + v_proj.weight`)."""
    part = re.compile(r"(.*\.(?:attention\.qkv|mlp\.weights_in))\.\w+\.(weight|bias)")
    fused = {}
    for new, old in names.items():
        if match := part.fullmatch(new):
            fused.setdefault(f"{match.group(1)}.{match.group(2)}", []).append(old)
    return {**names, **{key: " + ".join(parts) for key, parts in fused.items()}}


def _zero_key_bias(state_dict: dict[str, torch.Tensor]) -> bool:
    """Give split q/k/v projections with query and value biases but none on the key a zero key bias (DINOv3 never
    learns one); True when it did."""
    added = False
    for key in [key for key in state_dict if key.endswith(".attention.qkv.q.bias")]:
        key_bias = key.replace(".q.bias", ".k.bias")
        if key_bias not in state_dict:
            state_dict[key_bias] = torch.zeros_like(state_dict[key])
            added = True
    return added


def _conversion(
    converted: dict[str, torch.Tensor], names: dict, source_format: str, notes: list[str], **fields
) -> Conversion:
    """The Conversion of ViTReg-named DINOv3 weights: the rest of the architecture read off the shapes."""
    converted, names = _finish_mlp(converted, names)
    converted, names = _fuse(converted), _fused_names(names)
    patch = _tensor(converted, "embeddings.patch_embeddings.projection.weight", 4)  # [D, C, p, p]
    dim, patch_size = patch.shape[0], patch.shape[2]
    if patch.shape[2] != patch.shape[3]:
        raise UserError(f"{names.get('embeddings.patch_embeddings.projection.weight')}: non-square patches")
    block = "encoder.layer.0"
    swiglu = f"{block}.mlp.weights_in.weight" in converted
    mlp = ("mlp.weights_in", "mlp.weights_out") if swiglu else ("mlp.fc1", "mlp.fc2")
    hidden, _ = _mlp_shape(converted, block, mlp)
    registers = converted.get("embeddings.register_tokens")
    mask_token = converted.get("embeddings.mask_token")
    if mask_token is not None:
        converted["embeddings.mask_token"] = mask_token.reshape(1, -1)  # transformers: [1, 1, D]
    config = _make_config(
        **{
            "hidden_size": dim,
            "num_hidden_layers": _depth(converted, r"encoder\.layer\.(\d+)\."),
            "intermediate_size": hidden,
            "use_swiglu_ffn": swiglu,
            "num_channels": patch.shape[1],
            "patch_size": patch_size,
            "image_size": 224 if 224 % patch_size == 0 else 14 * patch_size,
            "num_register_tokens": registers.shape[1] if registers is not None else 0,
            "qkv_bias": f"{block}.attention.qkv.bias" in converted,
            "proj_bias": f"{block}.attention.proj.bias" in converted,
            "ffn_bias": f"{block}.{mlp[0]}.bias" in converted,
            "use_mask_token": mask_token is not None,
            "untie_cls_and_patch_norms": "cls_norm.weight" in converted,
            "untie_global_and_local_cls_norm": "local_cls_norm.weight" in converted,
            "position_embedding_type": "rope",
            **DINOV3_SETTINGS,
            "layerscale_value": 1e-5 if f"{block}.layer_scale1.lambda1" in converted else None,
            **fields,
        }
    )
    if "classifier.weight" in converted:
        converted.pop("classifier.weight")
        converted.pop("classifier.bias", None)
        notes.append("dropped timm's classifier head (ViTReg's head reads the CLS token and the mean patch token)")
    return Conversion(config, converted, source_format, notes, names)


def _check_heads(num_heads: int | None, heads: int, reason: str) -> None:
    if num_heads is not None and num_heads != heads:
        raise UserError(f"--num-heads {num_heads} contradicts {reason} ({heads} heads)")


def convert_dinov3_hub(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> Conversion:
    """Official DINOv3 layout (a hub `.pth` backbone) -> ViTReg; heads and RoPE come from `rope_embed.periods`."""
    state_dict = dict(state_dict)
    masks = {key: state_dict.pop(key) for key in list(state_dict) if BIAS_MASK.fullmatch(key)}
    if PERIODS not in state_dict:
        raise UserError(f"missing key {PERIODS}")
    periods = state_dict.pop(PERIODS)
    dim = _tensor(state_dict, "patch_embed.proj.weight", 4).shape[0]
    rope, notes = rope_settings(periods, dim)
    _check_heads(num_heads, rope["num_attention_heads"], PERIODS)
    depth = _depth(state_dict, r"blocks\.(\d+)\.")
    mask_k_bias = _check_bias_masks(masks, depth, state_dict.get("blocks.0.attn.qkv.bias"))
    names = {}
    converted = rename(state_dict, HUB_RULES, names)
    return _conversion(converted, names, "dinov3-hub", notes, mask_k_bias=mask_k_bias, **rope)


def convert_dinov3_transformers(
    state_dict: dict[str, torch.Tensor], folder_config: dict | None, num_heads: int | None = None
) -> Conversion:
    """transformers DINOv3ViTModel / DINOv3ViTBackbone folder -> ViTReg (heads, RoPE and eps from its config.json)."""
    folder_config = folder_config or {}
    names = {}
    converted = rename(state_dict, TRANSFORMERS_RULES, names)
    mask_k_bias = _zero_key_bias(converted)
    gated = any(".mlp.gate." in key for key in converted)
    activation = folder_config.get("hidden_act", "silu" if gated else "gelu")
    if gated and activation not in ("silu", "swish"):
        raise UserError(f"config.json: hidden_act {activation!r} in a gated MLP (ViTReg's SwiGLU gates with SiLU)")
    heads = folder_config.get("num_attention_heads")
    if heads is None:
        raise UserError("config.json: missing num_attention_heads")
    _check_heads(num_heads, heads, "config.json")
    fields = dict(
        num_attention_heads=heads,
        layer_norm_eps=folder_config.get("layer_norm_eps", 1e-5),
        rope_theta=folder_config.get("rope_theta", ROPE_BASE),
        rope_shift_coords=folder_config.get("pos_embed_shift"),
        rope_jitter_coords=folder_config.get("pos_embed_jitter"),
        rope_rescale_coords=folder_config.get("pos_embed_rescale", 2.0),
        mask_k_bias=mask_k_bias,
    )
    if not gated:
        fields["hidden_act"] = activation
    return _conversion(converted, names, "dinov3-transformers", [], **fields)


def convert_dinov3_timm(state_dict: dict[str, torch.Tensor], num_heads: int | None = None) -> Conversion:
    """timm `vit_*_patch16_dinov3*` (Eva) state dict -> ViTReg; timm keeps no RoPE buffer: its builders' base 100."""
    names = {}
    converted = rename(state_dict, TIMM_RULES, names)
    mask_k_bias = _zero_key_bias(converted)  # timm's _qkvb models: q_bias, v_bias and a fixed zero key bias
    dim = _tensor(converted, "embeddings.patch_embeddings.projection.weight", 4).shape[0]
    depth = _depth(converted, r"encoder\.layer\.(\d+)\.")
    # The head dimension is 64 in every DINOv3 ViT but the 7B (128): take the official row of this shape.
    official = [row for row in DINOV3_BACKBONES.values() if (row.hidden_size, row.num_hidden_layers) == (dim, depth)]
    heads = _heads(dim, num_heads) if num_heads or not official else official[0].num_attention_heads
    if dim % (4 * heads):
        raise UserError(f"width {dim} with {heads} heads: the head dimension must be a multiple of 4 (RoPE)")
    notes = [f"RoPE: base {ROPE_BASE:g} as timm's *_dinov3 builders (timm checkpoints keep no periods)"]
    fields = dict(num_attention_heads=heads, rope_theta=ROPE_BASE, rope_rescale_coords=None, mask_k_bias=mask_k_bias)
    conversion = _conversion(converted, names, "dinov3-timm", notes, **fields)
    if num_heads is None and not official:
        conversion.notes.append(guessed_heads_note(conversion.config))
        conversion.guessed_heads = True
    return conversion


# --- Writing ---------------------------------------------------------------------------------------------------------


def to_dinov3(state_dict: dict[str, torch.Tensor], config: ViTRegConfig) -> dict[str, torch.Tensor]:
    """ViTReg backbone weights -> the official DINOv3 hub layout, in its key order, with the `rope_embed.periods` and
    `bias_mask` buffers (what `DinoVisionTransformer` loads strictly)."""
    if not config.uses_rope or not config.use_cls_token or config.use_fc_norm:
        raise UserError("the official DINOv3 layout needs RoPE, a CLS token and a final norm on every token")
    split = {}
    for key, tensor in state_dict.items():
        if key.endswith(("mlp.weights_in.weight", "mlp.weights_in.bias")):
            gate, value = tensor.chunk(2, dim=0)
            split[key.replace("weights_in.", "weights_in.gate.")] = gate
            split[key.replace("weights_in.", "weights_in.up.")] = value
        else:
            split[key] = tensor
    exported = rename(split, EXPORT_RULES)
    dtype = exported["cls_token"].dtype
    exported[PERIODS] = rope_periods(config).to(getattr(torch, config.rope_periods_dtype))
    exported.setdefault("mask_token", torch.zeros(1, config.hidden_size, dtype=dtype))
    exported["mask_token"] = exported["mask_token"].reshape(1, -1)
    if config.qkv_bias and config.mask_k_bias:
        mask = bias_mask(3 * config.hidden_size).to(dtype)
        exported.update({f"blocks.{block}.attn.qkv.bias_mask": mask for block in range(config.num_hidden_layers)})
    order = official_shapes(config)
    if set(order) != set(exported):
        difference = sorted(set(order) ^ set(exported))
        raise UserError(f"these weights do not form an official DINOv3 model: {', '.join(difference[:3])}")
    return {key: exported[key].contiguous() for key in order}
