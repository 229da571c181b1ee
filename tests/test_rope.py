"""DINOv3's switches in ViTReg: RoPE, key-bias masking, untied norms, SwiGLU widths; all off by default.

Parity of whole DINOv3 models with transformers and timm is in tests/test_dinov3_conversion.py.
"""

import math

import pytest
import torch
from transformers import DINOv3ViTConfig
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTRopePositionEmbedding

from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel


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


def test_rope_periods_follow_dinov3():
    # transformers computes the inverse periods; DINOv3 the periods base ** (2i / (d / 2)).
    config = rope_config(hidden_size=384, num_attention_heads=6)
    reference = DINOv3ViTRopePositionEmbedding(DINOv3ViTConfig(hidden_size=384, num_attention_heads=6))
    torch.testing.assert_close(config.rope_periods(), 1 / reference.inv_freq, rtol=1e-6, atol=0)
    assert config.rope_periods().shape == (16,) and config.rope_periods()[0] == 1
    geometric = rope_config(rope_theta=None, rope_min_period=0.5, rope_max_period=50.0).rope_periods()
    torch.testing.assert_close(geometric[[0, -1]], torch.tensor([0.5, 50.0]))
    ratios = geometric[1:] / geometric[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))


def test_rope_sin_cos_rotate_rows_then_columns():
    config = rope_config()
    sin, cos = random_model(config).embeddings.rotary(32, 48, torch.device("cpu"))  # 2 x 3 patches
    assert sin.shape == cos.shape == (6, 32)
    periods = config.rope_periods()  # [8]
    # Patch (row 1, column 2): centre (1.5 / 2, 2.5 / 3) mapped to [-1, 1].
    row, col = 2 * 1.5 / 2 - 1, 2 * 2.5 / 3 - 1
    angles = torch.cat((2 * math.pi * row / periods, 2 * math.pi * col / periods)).tile(2)
    torch.testing.assert_close(sin[5], torch.sin(angles))
    torch.testing.assert_close(cos[5], torch.cos(angles))


def test_rope_augmentations_apply_in_training_only():
    plain = random_model(rope_config())
    augmented = random_model(rope_config(rope_rescale_coords=2.0, rope_shift_coords=0.1, rope_jitter_coords=1.5))
    size = (64, 64, torch.device("cpu"))
    torch.testing.assert_close(plain.embeddings.rotary(*size), augmented.embeddings.rotary(*size))
    augmented.train()
    first, second = augmented.embeddings.rotary(*size), augmented.embeddings.rotary(*size)
    assert not torch.equal(first[0], second[0])
    plain.train()
    torch.testing.assert_close(plain.embeddings.rotary(*size), augmented.eval().embeddings.rotary(*size))


def test_mask_k_bias_ignores_the_key_bias_only():
    # A key bias adds the same score to all keys of a query, which softmax cancels up to rounding; DINOv3 masks it
    # out of the projection, so the keys are exactly W_k x.
    model = random_model(rope_config(mask_k_bias=True))
    attention = model.encoder.layer[0].attention
    tokens = torch.randn(2, 5, 64)
    qkv = attention.project_qkv(tokens)
    torch.testing.assert_close(qkv[..., 64:128], tokens @ attention.qkv.weight[64:128].T, atol=1e-6, rtol=0)
    torch.testing.assert_close(qkv[..., :64], attention.qkv(tokens)[..., :64], atol=0, rtol=0)
    pixels = torch.randn(2, 3, 64, 64)
    before = model(pixels).last_hidden_state
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.qkv.bias[64:128] += 3.0  # the key third: no effect at all
    torch.testing.assert_close(model(pixels).last_hidden_state, before, atol=0, rtol=0)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.qkv.bias[:64] += 3.0  # the query third still counts
    assert not torch.allclose(model(pixels).last_hidden_state, before)


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
    ],
)
def test_rope_settings_that_describe_no_model_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        rope_config(**fields)


def test_rope_periods_keep_the_precision_they_were_stored_in():
    exact = rope_config(hidden_size=384, num_attention_heads=6).rope_periods()
    rounded = rope_config(hidden_size=384, num_attention_heads=6, rope_periods_dtype="bfloat16").rope_periods()
    assert rounded.dtype == torch.float32 and torch.equal(rounded, exact.bfloat16().float())
    assert not torch.equal(rounded, exact)
    with pytest.raises(ValueError, match="rope_periods_dtype"):
        rope_config(rope_periods_dtype="int8")
