"""ViTRegModel against independent implementations, on every token (CLS, registers, patches), fp32 within 1e-5.

References: timm's VisionTransformer (antialiased size-based position interpolation, the DINOv2 register
algorithm), transformers' Dinov2WithRegistersModel (the same algorithm) and Dinov2Model. transformers' Dinov2
interpolates to the target size without antialias, which is *not* the official algorithm for DINOv2 models
without registers (scale factor `(grid + 0.1) / old_grid`): it is compared to ViTReg on that path
(`interpolate_offset=0`), and the official 0.1-offset path is compared to the same transformers model whose
interpolation is replaced by a hand-written bicubic resampler that follows the official formula.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import images, make_timm, make_vitreg, max_diff, parity_config
from torch import nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.modeling_vitreg import ViTRegModel

TOL = 1e-5
# Image sizes for patch 4 on a 32 px (8x8) position grid: native, downscaled, the 224x308 shape of a 14 px
# model (16x22 -> 8x11 here), a non-square image with exactly the native token count (must still interpolate),
# and an upscaled non-square one.
SIZES = [(32, 32), (16, 16), (32, 44), (16, 64), (48, 40)]


def to_transformers_state_dict(model: ViTRegModel) -> dict[str, torch.Tensor]:
    """Map ViTReg weights onto transformers' Dinov2 / Dinov2WithRegisters module names (split qkv, split SwiGLU)."""
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith("attention.qkv"):
            base = prefix[: -len("qkv")]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}{name}.{leaf}"] = part
        elif prefix.endswith("attention.proj"):
            out[f"{prefix[: -len('proj')]}o_proj.{leaf}"] = value
        elif prefix.endswith("mlp.weights_in"):
            base = prefix[: -len("weights_in")]
            gate, up = value.chunk(2, dim=0)
            out[f"{base}gate_proj.{leaf}"], out[f"{base}up_proj.{leaf}"] = gate, up
        elif prefix.endswith("mlp.weights_out"):
            out[f"{prefix[: -len('weights_out')]}down_proj.{leaf}"] = value
        else:
            out[key] = value
    return out


def make_transformers(model: ViTRegModel) -> nn.Module:
    """transformers' Dinov2WithRegistersModel (or Dinov2Model without registers) with `model`'s weights."""
    config = model.config
    fields = dict(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        mlp_ratio=config.mlp_ratio,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        layerscale_value=config.layerscale_value,
        use_swiglu_ffn=config.use_swiglu_ffn,
    )
    if config.num_register_tokens:
        reference = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(num_register_tokens=config.num_register_tokens, **fields)
        )
    else:
        reference = Dinov2Model(Dinov2Config(**fields))
    reference.set_attn_implementation("eager")
    weights = to_transformers_state_dict(model)
    weights.setdefault("embeddings.mask_token", torch.zeros(1, config.hidden_size))  # transformers always has one
    reference.load_state_dict(weights, strict=True)
    return reference.eval()


TIMM_VARIANTS = {
    "registers": {},
    "swiglu": {"use_swiglu_ffn": True},
    "no_registers": {"num_register_tokens": 0},
    "no_layerscale": {"layerscale_value": None},
    "cls_without_position": {"cls_token_position_embedding": False},
    "gap_fc_norm": {"use_cls_token": False, "pooling": "mean", "use_fc_norm": True},
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_matches_timm_on_every_token(variant, size):
    model = make_vitreg(parity_config(**TIMM_VARIANTS[variant]))
    reference = make_timm(model)
    pixels = images(*size)
    with torch.no_grad():
        ours = model(pixels)
        tokens = reference.forward_features(pixels)  # [B, P + HW, D]
        pooled = reference.forward_head(tokens, pre_logits=True)  # [B, D]
    assert max_diff(ours.last_hidden_state, tokens) <= TOL
    assert max_diff(ours.pooler_output, pooled) <= TOL
    prefix = model.config.num_prefix_tokens
    assert ours.last_hidden_state.shape[1] == prefix + (size[0] // 4) * (size[1] // 4)
    assert max_diff(ours.patch_tokens, tokens[:, prefix:]) <= TOL
    start = int(model.config.use_cls_token)
    assert max_diff(ours.register_tokens, tokens[:, start:prefix]) <= TOL


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_matches_transformers_dinov2_with_registers(swiglu, size):
    model = make_vitreg(parity_config(use_mask_token=True, use_swiglu_ffn=swiglu))
    reference = make_transformers(model)
    pixels = images(*size)
    masked = torch.rand(2, (size[0] // 4) * (size[1] // 4), generator=torch.Generator().manual_seed(2)) < 0.4
    with torch.no_grad():
        for bool_masked_pos in (None, masked):
            ours = model(pixels, bool_masked_pos=bool_masked_pos)
            theirs = reference(pixels, bool_masked_pos=bool_masked_pos)
            assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) <= TOL
            assert max_diff(ours.pooler_output, theirs.pooler_output) <= TOL


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_transformers_dinov2_size_based_interpolation(size):
    # transformers' Dinov2 resizes to the target grid without antialias (no 0.1 offset).
    model = make_vitreg(parity_config(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0))
    reference = make_transformers(model)
    assert isinstance(reference, Dinov2Model)
    pixels = images(*size)
    with torch.no_grad():
        assert max_diff(model(pixels).last_hidden_state, reference(pixels).last_hidden_state) <= TOL


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps around a sample at fraction `t` (PyTorch's a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(in_size: int, out_size: int, step: float) -> np.ndarray:
    """`[out, in]` resampling matrix: output i samples input coordinate `(i + 0.5) * step - 0.5`, edges clamped."""
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        source = (i + 0.5) * step - 0.5
        base = int(np.floor(source))
        for tap, weight in zip(range(base - 1, base + 3), cubic_weights(source - base)):
            matrix[i, min(max(tap, 0), in_size - 1)] += weight
    return matrix


def resample_grid(patch_pos: torch.Tensor, rows: int, cols: int, row_step: float, col_step: float) -> torch.Tensor:
    """Bicubic resampling (no antialias) of a `[g, g, D]` grid to `[rows, cols, D]` with the given sample steps."""
    grid = patch_pos.double().numpy()
    row_matrix = bicubic_matrix(grid.shape[0], rows, row_step)
    col_matrix = bicubic_matrix(grid.shape[1], cols, col_step)
    out = np.einsum("rg,ghd,ch->rcd", row_matrix, grid, col_matrix)
    return torch.from_numpy(out).to(patch_pos.dtype)


def test_hand_bicubic_reproduces_torch_size_interpolation():
    # The hand resampler is the reference for the 0.1-offset path: first check it on the plain size path.
    patch_pos = torch.randn(8, 8, 5)
    for rows, cols in [(4, 4), (8, 11), (12, 10), (3, 16)]:
        ours = resample_grid(patch_pos, rows, cols, 8 / rows, 8 / cols)
        torch_out = F.interpolate(patch_pos.permute(2, 0, 1)[None], size=(rows, cols), mode="bicubic")
        assert max_diff(ours, torch_out[0].permute(1, 2, 0)) <= 1e-5


def use_official_offset_interpolation(embeddings: nn.Module, offset: float) -> None:
    """Replace a transformers Dinov2 embedding's interpolation by DINOv2's `(grid + offset) / old_grid` scale factor."""

    def interpolate_pos_encoding(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pos = embeddings.position_embeddings  # [1, 1 + g*g, D]
        old = int((pos.shape[1] - 1) ** 0.5)
        rows, cols = height // embeddings.config.patch_size, width // embeddings.config.patch_size
        if rows * cols == old * old and height == width:
            return pos
        # Output size floor(old * (n + offset) / old) = n, but sample spacing old / (n + offset) instead of old / n.
        grid = resample_grid(pos[0, 1:].reshape(old, old, -1), rows, cols, old / (rows + offset), old / (cols + offset))
        return torch.cat((pos[:, :1], grid.reshape(1, rows * cols, -1)), dim=1)

    embeddings.interpolate_pos_encoding = interpolate_pos_encoding


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_official_offset_interpolation_without_registers(size):
    model = make_vitreg(parity_config(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1))
    reference = make_transformers(model)
    use_official_offset_interpolation(reference.embeddings, 0.1)
    pixels = images(*size)
    with torch.no_grad():
        assert max_diff(model(pixels).last_hidden_state, reference(pixels).last_hidden_state) <= TOL


@pytest.mark.parametrize("size", [(16, 16), (32, 44), (16, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_interpolation_algorithms_really_differ(size):
    # Guards the parity tests: each config field picks a measurably different algorithm off the native grid.
    base = dict(num_register_tokens=0)
    variants = {
        "antialias": parity_config(interpolate_antialias=True, interpolate_offset=0, **base),
        "size": parity_config(interpolate_antialias=False, interpolate_offset=0, **base),
        "offset": parity_config(interpolate_antialias=False, interpolate_offset=0.1, **base),
    }
    pos = {}
    for name, config in variants.items():
        model = make_vitreg(config)
        with torch.no_grad():
            pos[name] = model.embeddings.interpolate_pos_encoding(*size)
    assert pos["size"].shape == (1, 1 + (size[0] // 4) * (size[1] // 4), 32)
    assert max_diff(pos["size"], pos["offset"]) > 1e-3
    if size[0] < 32:  # antialias only changes downscaling
        assert max_diff(pos["size"], pos["antialias"]) > 1e-3


@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_native_grid_is_not_interpolated(offset):
    # DINOv2 returns the trained embeddings at the native square grid: the resampling matrices are then the identity,
    # so the result is bit for bit the parameter (no branch on the shape decides it).
    model = make_vitreg(parity_config(interpolate_offset=offset, interpolate_antialias=not offset))
    with torch.no_grad():
        assert torch.equal(model.embeddings.interpolate_pos_encoding(32, 32), model.embeddings.position_embeddings)
