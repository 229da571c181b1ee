"""DINOv3's switches in ViTReg: RoPE, key-bias masking, untied norms, SwiGLU widths; all off by default.

RoPE is compared with DINOv3's own code, restated below; parity of whole DINOv3 models with transformers and timm is
in tests/test_dinov3_conversion.py.
"""

import math
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

# ---- DINOv3's RoPE, restated from facebookresearch/dinov3 -----------------------------------------------------------
# At commit 11c5863838518425a70b32aa11546a9583ae28e2 (the last to change either file; the same at 6876159a, July
# 2026). `RopePositionEmbedding` is dinov3/layers/rope_position_encoding.py verbatim but for comments;
# `rope_rotate_half` and `rope_apply` are dinov3/layers/attention.py verbatim; `dinov3_self_attention` is that
# file's `SelfAttention.forward` -> `compute_attention` -> `apply_rope` (with `LinearKMaskedBias` for the key bias)
# written as one function of the layer's weights.


class RopePositionEmbedding(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: Literal["min", "max", "separate"] = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        assert embed_dim % (4 * num_heads) == 0
        both_periods = min_period is not None and max_period is not None
        if (base is None and not both_periods) or (base is not None and both_periods):
            raise ValueError("Either `base` or `min_period`+`max_period` must be provided.")

        D_head = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.D_head = D_head
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords

        # Needs persistent=True because we do teacher.load_state_dict(student.state_dict()) to initialize the teacher
        self.dtype = dtype  # Don't rely on self.periods.dtype
        self.register_buffer(
            "periods",
            torch.empty(D_head // 4, device=device, dtype=dtype),
            persistent=True,
        )
        self._init_weights()

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        device = self.periods.device
        dtype = self.dtype
        dd = {"device": device, "dtype": dtype}

        # Prepare coords in range [-1, +1]
        if self.normalize_coords == "max":
            max_HW = max(H, W)
            coords_h = torch.arange(0.5, H, **dd) / max_HW  # [H]
            coords_w = torch.arange(0.5, W, **dd) / max_HW  # [W]
        elif self.normalize_coords == "min":
            min_HW = min(H, W)
            coords_h = torch.arange(0.5, H, **dd) / min_HW  # [H]
            coords_w = torch.arange(0.5, W, **dd) / min_HW  # [W]
        elif self.normalize_coords == "separate":
            coords_h = torch.arange(0.5, H, **dd) / H  # [H]
            coords_w = torch.arange(0.5, W, **dd) / W  # [W]
        else:
            raise ValueError(f"Unknown normalize_coords: {self.normalize_coords}")
        coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1)  # [H, W, 2]
        coords = coords.flatten(0, 1)  # [HW, 2]
        coords = 2.0 * coords - 1.0  # Shift range [0, 1] to [-1, +1]

        # Shift coords by adding a uniform value in [-shift, shift]
        if self.training and self.shift_coords is not None:
            shift_hw = torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)
            coords += shift_hw[None, :]

        # Jitter coords by multiplying the range [-1, 1] by a log-uniform value in [1/jitter, jitter]
        if self.training and self.jitter_coords is not None:
            jitter_max = np.log(self.jitter_coords)
            jitter_min = -jitter_max
            jitter_hw = torch.empty(2, **dd).uniform_(jitter_min, jitter_max).exp()
            coords *= jitter_hw[None, :]

        # Rescale coords by multiplying the range [-1, 1] by a log-uniform value in [1/rescale, rescale]
        if self.training and self.rescale_coords is not None:
            rescale_max = np.log(self.rescale_coords)
            rescale_min = -rescale_max
            rescale_hw = torch.empty(1, **dd).uniform_(rescale_min, rescale_max).exp()
            coords *= rescale_hw

        # Prepare angles and sin/cos
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # [HW, 2, D//4]
        angles = angles.flatten(1, 2)  # [HW, D//2]
        angles = angles.tile(2)  # [HW, D]
        cos = torch.cos(angles)  # [HW, D]
        sin = torch.sin(angles)  # [HW, D]

        return (sin, cos)  # 2 * [HW, D]

    def _init_weights(self):
        device = self.periods.device
        dtype = self.dtype
        if self.base is not None:
            periods = self.base ** (
                2 * torch.arange(self.D_head // 4, device=device, dtype=dtype) / (self.D_head // 2)
            )  # [D//4]
        else:
            base = self.max_period / self.min_period
            exponents = torch.linspace(0, 1, self.D_head // 4, device=device, dtype=dtype)  # [D//4] range [0, 1]
            periods = base**exponents  # range [1, max_period / min_period]
            periods = periods / base  # range [min_period / max_period, 1]
            periods = periods * self.max_period  # range [min_period, max_period]
        self.periods.data = periods


def rope_rotate_half(x: Tensor) -> Tensor:
    # x:   [ x0  x1  x2  x3  x4  x5]
    # out: [-x3 -x4 -x5  x0  x1  x2]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    # x:   [..., D], eg [x0,     x1,   x2,   x3,   x4,   x5]
    # sin: [..., D], eg [sin0, sin1, sin2, sin0, sin1, sin2]
    # cos: [..., D], eg [cos0, cos1, cos2, cos0, cos1, cos2]
    return (x * cos) + (rope_rotate_half(x) * sin)


def dinov3_self_attention(
    x: Tensor, qkv: nn.Linear, proj: nn.Linear, num_heads: int, mask_k_bias: bool, rope
) -> Tensor:
    """DINOv3's `SelfAttention(x, rope=rope)` with the weights of `qkv` and `proj` (no dropout: inference)."""
    bias = qkv.bias
    if mask_k_bias and bias is not None:
        # `LinearKMaskedBias`: bias * bias_mask, the mask 1 | 0 | 1 over q | k | v as DINOv3's checkpoints hold it.
        dim = qkv.in_features
        bias = bias * torch.cat((torch.ones(dim), torch.zeros(dim), torch.ones(dim))).to(bias.dtype)
    qkv = F.linear(x, qkv.weight, bias)
    # compute_attention
    B, N, _ = qkv.shape
    C = proj.in_features
    qkv = qkv.reshape(B, N, 3, num_heads, C // num_heads)
    q, k, v = torch.unbind(qkv, 2)
    q, k, v = [t.transpose(1, 2) for t in [q, k, v]]
    if rope is not None:
        # apply_rope: all operations in the dtype of rope, cast back to the dtype of q and k
        q_dtype = q.dtype
        k_dtype = k.dtype
        sin, cos = rope
        rope_dtype = sin.dtype
        q = q.to(dtype=rope_dtype)
        k = k.to(dtype=rope_dtype)
        N = q.shape[-2]
        prefix = N - sin.shape[-2]
        assert prefix >= 0
        q_prefix = q[:, :, :prefix, :]
        q = rope_apply(q[:, :, prefix:, :], sin, cos)  # [B, head, hw, D//head]
        q = torch.cat((q_prefix, q), dim=-2)  # [B, head, N, D//head]
        k_prefix = k[:, :, :prefix, :]
        k = rope_apply(k[:, :, prefix:, :], sin, cos)  # [B, head, hw, D//head]
        k = torch.cat((k_prefix, k), dim=-2)  # [B, head, N, D//head]
        q = q.to(dtype=q_dtype)
        k = k.to(dtype=k_dtype)
    x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    x = x.transpose(1, 2)
    x = x.reshape([B, N, C])
    # forward
    return proj(x)


# ---- ViTReg ----------------------------------------------------------------------------------------------------------


def rope_config(**overrides) -> ViTRegConfig:
    """A tiny DINOv3-like config: RoPE, 4 registers, patch 16, key bias masked."""
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2,
        patch_size=16,
        image_size=64,
        num_register_tokens=4,
        layer_norm_eps=1e-5,
        layerscale_value=0.5,
        position_embedding_type="rope",
        mask_k_bias=True,
    )
    return ViTRegConfig(**{**fields, **overrides})


def random_model(config: ViTRegConfig, seed: int = 0) -> ViTRegModel:
    torch.manual_seed(seed)
    model = ViTRegModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(0, parameter.shape[-1] ** -0.5 if parameter.ndim > 1 else 0.1)
            if "norm" in name and name.endswith("weight"):
                parameter.add_(1.0)
    return model


def dinov3_rope(config: ViTRegConfig, dtype: torch.dtype = torch.float32) -> RopePositionEmbedding:
    """DINOv3's RoPE module with the settings `config` describes (`dtype`: the one its periods are computed in)."""
    return RopePositionEmbedding(
        config.hidden_size,
        num_heads=config.num_attention_heads,
        base=config.rope_theta,
        min_period=config.rope_min_period,
        max_period=config.rope_max_period,
        normalize_coords=config.rope_normalize_coords,
        shift_coords=config.rope_shift_coords,
        jitter_coords=config.rope_jitter_coords,
        rescale_coords=config.rope_rescale_coords,
        dtype=dtype,
    )


def attention_calls(model: ViTRegModel, pixel_values: Tensor) -> list[dict]:
    """Run `model`; for every block's attention, the input, the RoPE `(sin, cos)` it was given, and its output."""
    calls = []

    def before(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        calls.append({"input": hidden_states, "rope": kwargs["rope"] if "rope" in kwargs else args[1]})

    def after(module, args, kwargs, output):
        calls[-1]["output"] = output[0] if isinstance(output, tuple) else output

    handles = []
    for layer in model.encoder.layer:
        handles.append(layer.attention.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(layer.attention.register_forward_hook(after, with_kwargs=True))
    try:
        with torch.no_grad():
            model(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == model.config.num_hidden_layers
    return calls


PERIODS = {
    "base 100": dict(rope_theta=100.0),  # DINOv3's
    "base 10000": dict(rope_theta=10000.0),
    "min/max periods": dict(rope_theta=None, rope_min_period=0.5, rope_max_period=50.0),
}
NORMALIZE = ["separate", "min", "max"]
# Square, wide and tall grids of 16 px patches, none of them the config's 4 x 4 but the first.
IMAGE_SIZES = [(64, 64), (32, 96), (112, 48)]


def test_defaults_describe_dinov2_unchanged():
    config = ViTRegConfig()
    assert not config.uses_rope and not config.mask_k_bias and not config.untie_cls_and_patch_norms
    keys = ViTRegModel(ViTRegConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1)).state_dict()
    assert "embeddings.position_embeddings" in keys and not any("cls_norm" in key for key in keys)
    # A config.json written before these switches existed loads with them off.
    old = {key: value for key, value in config.to_dict().items() if "rope" not in key and "untie" not in key}
    assert not ViTRegConfig.from_dict(old).uses_rope


def test_rope_model_has_no_learned_positions_and_accepts_any_grid():
    model = random_model(rope_config())
    assert "embeddings.position_embeddings" not in model.state_dict()
    for height, width in [(64, 64), (32, 96), (128, 48)]:
        output = model(torch.randn(1, 3, height, width))
        assert output.patch_tokens.shape == (1, height * width // 256, 64)


@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("periods", PERIODS)
def test_rope_sin_cos_and_attention_equal_dinov3(periods, normalize):
    config = rope_config(**PERIODS[periods], rope_normalize_coords=normalize)
    model, reference = random_model(config), dinov3_rope(config)
    for height, width in IMAGE_SIZES:
        rows, cols = height // 16, width // 16
        sin, cos = reference(H=rows, W=cols)  # [rows * cols, head_dim]
        for block, call in enumerate(attention_calls(model, torch.randn(2, 3, height, width))):
            where = f"block {block}, {rows}x{cols} patches"
            torch.testing.assert_close(call["rope"][0], sin, atol=1e-6, rtol=0, msg=f"sin, {where}")
            torch.testing.assert_close(call["rope"][1], cos, atol=1e-6, rtol=0, msg=f"cos, {where}")
            layer = model.encoder.layer[block].attention
            with torch.no_grad():
                expected = dinov3_self_attention(
                    call["input"], layer.qkv, layer.proj, config.num_attention_heads, config.mask_k_bias, (sin, cos)
                )  # [B, 1 + 4 + rows * cols, D]
            torch.testing.assert_close(call["output"], expected, atol=1e-5, rtol=1e-5, msg=where)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rope_periods_rounded_to_bfloat16_as_dinov3_stores_them(head_dim):
    # DINOv3 trained with periods computed in bfloat16 (ssl_default_config: pos_embed_rope_dtype bf16); its hub
    # models build the module in float32 and load those rounded periods from the checkpoint. The head sizes it ships
    # (64; 128 for ViT-7B) give exponents 2i / (d / 2) that bfloat16 holds exactly; at d = 96 it rounds them too,
    # and such periods match no ViTReg setting (the converter refuses them rather than guess).
    config = rope_config(hidden_size=2 * head_dim, rope_periods_dtype="bfloat16")
    reference = dinov3_rope(config)
    reference.load_state_dict(dinov3_rope(config, dtype=torch.bfloat16).state_dict())
    assert reference.periods.dtype == torch.float32
    sin, cos = reference(H=3, W=5)
    rope = attention_calls(random_model(config), torch.randn(1, 3, 48, 80))[0]["rope"]
    torch.testing.assert_close(rope[0], sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(rope[1], cos, atol=1e-6, rtol=0)


AUGMENTATIONS = {
    "shift": dict(rope_shift_coords=0.5),
    "jitter": dict(rope_jitter_coords=1.5),
    "rescale": dict(rope_rescale_coords=2.0),
    "all three": dict(rope_shift_coords=0.5, rope_jitter_coords=1.5, rope_rescale_coords=2.0),
}


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_rope_augmentations_draw_what_dinov3_draws_in_training_only(augmentation):
    config = rope_config(**AUGMENTATIONS[augmentation])
    model, reference = random_model(config), dinov3_rope(config)
    pixel_values = torch.randn(1, 3, 48, 80)  # 3 x 5 patches
    for seed in range(3):
        # DINOv3 draws from the global generator: the same seed, the same draws, if ViTReg draws them alike.
        torch.manual_seed(seed)
        rope = attention_calls(model.train(), pixel_values)[0]["rope"]
        torch.manual_seed(seed)
        sin, cos = reference.train()(H=3, W=5)
        torch.testing.assert_close(rope[0], sin, atol=1e-6, rtol=0, msg=f"sin, seed {seed}")
        torch.testing.assert_close(rope[1], cos, atol=1e-6, rtol=0, msg=f"cos, seed {seed}")
    # Inference: no augmentation, in either.
    rope = attention_calls(model.eval(), pixel_values)[0]["rope"]
    sin, cos = reference.eval()(H=3, W=5)
    torch.testing.assert_close(rope[0], sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(rope[1], cos, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    assert not torch.allclose(reference.train()(H=3, W=5)[0], sin)  # the reference does augment: the test has teeth


def test_mask_k_bias_ignores_the_key_bias_only():
    # A key bias adds the same score to all keys of a query, which softmax cancels up to rounding; DINOv3 masks it
    # out of the projection (`LinearKMaskedBias`, bias_mask 1 | 0 | 1), so the keys are exactly W_k x.
    model = random_model(rope_config(mask_k_bias=True))
    qkv = model.encoder.layer[0].attention.qkv
    tokens = torch.randn(2, 5, 64)
    with torch.no_grad():
        out, weight, bias = qkv(tokens), qkv.weight, qkv.bias
        torch.testing.assert_close(out[..., :64], tokens @ weight[:64].T + bias[:64], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[..., 64:128], tokens @ weight[64:128].T, atol=1e-6, rtol=0)
        torch.testing.assert_close(out[..., 128:], tokens @ weight[128:].T + bias[128:], atol=1e-6, rtol=0)
    pixels = torch.randn(2, 3, 64, 64)
    before = model(pixels).last_hidden_state
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.qkv.bias[64:128] += 3.0  # the key third: no effect at all
    torch.testing.assert_close(model(pixels).last_hidden_state, before, atol=0, rtol=0)


def test_untied_norms_norm_the_prefix_apart():
    config = rope_config(untie_cls_and_patch_norms=True, untie_global_and_local_cls_norm=True)
    model = random_model(config)
    assert {"cls_norm.weight", "local_cls_norm.weight"} <= set(model.state_dict())
    pixels = torch.randn(2, 3, 64, 64)
    output = model(pixels, output_hidden_states=True)
    last = output.hidden_states[-1]
    torch.testing.assert_close(output.last_hidden_state[:, :5], model.cls_norm(last[:, :5]))
    torch.testing.assert_close(output.patch_tokens, model.layernorm(last[:, 5:]))
    torch.testing.assert_close(output.pooler_output, model.cls_norm(last[:, 0]))
    patches = model.get_intermediate_layers(pixels, n=1)[0]
    torch.testing.assert_close(patches, output.patch_tokens)


@pytest.mark.parametrize(
    ("dim", "ratio", "align", "width"),
    [(384, 6, 8, 1536), (1024, 6, 8, 4096), (1280, 6, 8, 5120), (4096, 3, 64, 8192), (1536, 4, 8, 4096)],
)
def test_swiglu_width_as_dinov3_computes_it(dim, ratio, align, width):
    config = ViTRegConfig(
        hidden_size=dim, num_attention_heads=dim // 64, mlp_ratio=ratio, use_swiglu_ffn=True, swiglu_align_to=align
    )
    assert config.mlp_hidden_size == width


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"position_embedding_type": "sincos"}, "position_embedding_type"),
        ({"rope_min_period": 0.5, "rope_max_period": 10.0}, "either rope_theta"),
        ({"rope_theta": None}, "either rope_theta"),
        ({"rope_normalize_coords": "diagonal"}, "rope_normalize_coords"),
        ({"hidden_size": 36, "num_attention_heads": 2}, "multiple of 4"),
        ({"rope_periods_dtype": "int8"}, "rope_periods_dtype"),
    ],
)
def test_rope_settings_that_describe_no_model_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        rope_config(**fields)
