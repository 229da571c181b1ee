"""Conversion parity: every layout converted to ViTReg matches timm / transformers on every token (CLS, registers,
patches) at the native size, 224 and non-square sizes; heads' logits likewise."""

import json
import math

import pytest
import timm
import timm.models.vision_transformer as timm_vit
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.conversion import (
    OFFICIAL_ARCHITECTURES,
    build_model,
    convert,
    random_head_state_dict,
    random_official_state_dict,
    read_source,
)
from vitreg.conversion.layouts import to_dinov2
from vitreg.conversion.reference import max_token_difference, timm_reference

TOL = 1e-5
TINY = dict(hidden_size=128, num_hidden_layers=2)  # 2 heads of 64


def sizes(patch: int, native: int) -> list[tuple[int, int]]:
    return [(native, native), (16 * patch, 16 * patch), (16 * patch, 22 * patch)]


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights that keep every block, LayerScale and token relevant (inits leave LayerScale at 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif name.endswith(("gamma", "lambda1")):
                param.copy_(0.5 + 0.1 * noise)
            elif param.ndim >= 2 and "token" not in name and "pos" not in name and "position" not in name:
                param.copy_(noise * math.prod(param.shape[1:]) ** -0.5)
            else:
                param.copy_(noise)
    return module.eval()


def official_resample(posemb, new_size, old_size=None, num_prefix_tokens=1, **_):
    """The official DINOv2 algorithm without registers (reference doc): bicubic by scale factor (n + 0.1) / grid."""
    prefix, grid_part = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = math.isqrt(grid_part.shape[1])
    if tuple(new_size) == (grid, grid):
        return posemb
    dim = posemb.shape[-1]
    grid_part = grid_part.float().reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    scale = ((new_size[0] + 0.1) / grid, (new_size[1] + 0.1) / grid)
    grid_part = F.interpolate(grid_part, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    assert tuple(grid_part.shape[-2:]) == tuple(new_size)
    grid_part = grid_part.permute(0, 2, 3, 1).reshape(1, -1, dim).to(posemb.dtype)
    return torch.cat((prefix, grid_part), dim=1)


@pytest.mark.parametrize("name", list(OFFICIAL_ARCHITECTURES))
def test_every_official_architecture_matches_timm(name, monkeypatch):
    arch = OFFICIAL_ARCHITECTURES[name]
    state = random_official_state_dict(name, **TINY)
    conversion, source_state = read_source_dict(state)
    config = conversion.config
    assert conversion.source_format == "dinov2-hub"
    assert (config.num_register_tokens, config.use_swiglu_ffn, config.image_size) == (
        arch.num_register_tokens,
        arch.ffn == "swiglu",
        518,
    )
    assert config.interpolate_antialias == bool(arch.num_register_tokens)
    assert config.interpolate_offset == (0.0 if arch.num_register_tokens else 0.1)
    model = build_model(conversion)
    reference = timm_reference(source_state, "dinov2-hub", config)
    if not arch.num_register_tokens:
        # timm resizes without DINOv2's 0.1 offset; the official algorithm (written from the reference doc) replaces
        # timm's resampler so that the rest of timm stays the independent implementation.
        assert max_token_difference(model, reference, [(518, 518)])[(518, 518)] <= TOL
        off_native = max_token_difference(model, reference, sizes(14, 518)[1:])
        assert min(off_native.values()) > 1e-3, "timm's own resize should differ from the offset path"
        monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", official_resample)
    differences = max_token_difference(model, reference, sizes(14, 518))
    assert max(differences.values()) <= TOL, differences


def read_source_dict(state: dict, tmp_name: str = "checkpoint.pth"):
    """Convert an in-memory checkpoint through the file path a user takes."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / tmp_name
        if tmp_name.endswith(".safetensors"):
            save_file({key: value.contiguous() for key, value in state.items()}, path)
        else:
            torch.save(state, path)
        conversion, source_state = read_source(path)
        # materialise: the memory map goes away with the folder
        conversion.state_dict = {key: value.clone() for key, value in conversion.state_dict.items()}
        source_state = {key: value.clone() for key, value in source_state.items()}
    return conversion, source_state


@pytest.mark.parametrize("wrapper", ["teacher", "model-module"])
def test_training_checkpoint_chunked_patch16_matches_timm(wrapper):
    # DINOv2's trainer: patch 16, 224 crops (14x14 grid), 4 chunks of blocks, heads beside the backbone.
    flat = random_official_state_dict(
        "dinov2_vits14_reg4", hidden_size=128, num_hidden_layers=4, image_size=224, patch_size=16
    )
    prefix = "backbone." if wrapper == "teacher" else "module.backbone."
    chunked = {}
    for key, value in flat.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = key.replace(f"blocks.{index}.", f"blocks.{index // 2}.{index}.", 1)
        chunked[prefix + key] = value
    chunked["dino_head.mlp.0.weight"] = torch.randn(16, 128)
    chunked["ibot_head.last_layer.weight_g"] = torch.randn(16, 1)
    wrapped = {"teacher": chunked} if wrapper == "teacher" else {"model": chunked, "iteration": 3}
    conversion, _ = read_source_dict(wrapped)
    config = conversion.config
    assert conversion.source_format == "dinov2-train"
    assert (config.patch_size, config.image_size, config.num_hidden_layers) == (16, 224, 4)
    reference = timm_reference(flat, "dinov2-train", config)
    differences = max_token_difference(build_model(conversion), reference, sizes(16, 224))
    assert max(differences.values()) <= TOL, differences


@pytest.mark.parametrize(
    "model_name, suffix",
    [
        ("vit_small_patch14_reg4_dinov2", ".safetensors"),
        ("vit_giant_patch14_reg4_dinov2", ".pth"),
        ("vit_small_patch14_dinov2", ".bin"),
    ],
)
def test_timm_dinov2_layouts_match_timm(model_name, suffix, monkeypatch):
    reference = randomize(
        timm.create_model(model_name, embed_dim=128, depth=2, num_heads=2, img_size=518, dynamic_img_size=True)
    )
    conversion, _ = read_source_dict(reference.state_dict(), "model" + suffix)
    assert conversion.source_format == "timm"
    assert conversion.config.cls_token_position_embedding == ("reg4" not in model_name)
    assert conversion.config.use_swiglu_ffn == ("giant" in model_name)
    if "reg4" not in model_name:
        monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", official_resample)  # the official path wins
    differences = max_token_difference(build_model(conversion), reference, sizes(14, 518))
    assert max(differences.values()) <= TOL, differences


@pytest.mark.parametrize("model_name", ["vit_base_patch16_reg4_gap_256", "vit_medium_patch16_reg4_gap_256"])
def test_timm_sbb_gap_models_match_timm_tokens_and_logits(model_name):
    # No CLS token, average pooling with fc_norm; the base model has no LayerScale.
    reference = randomize(
        timm.create_model(model_name, embed_dim=128, depth=2, num_heads=2, num_classes=10, dynamic_img_size=True)
    )
    conversion, _ = read_source_dict(reference.state_dict(), "model.safetensors")
    config = conversion.config
    assert not config.use_cls_token and config.use_fc_norm and config.pooling == "mean"
    assert (config.layerscale_value is None) == ("base" in model_name)
    model = build_model(conversion)
    pixels = torch.randn(2, 3, 256, 352)
    with torch.no_grad():
        features = reference.forward_features(pixels)
        tokens = model.vitreg(pixel_values=pixels).last_hidden_state
        logits = model(pixel_values=pixels).logits
        expected_logits = reference.forward_head(features)
    assert (tokens - features).abs().max() <= TOL
    assert (logits - expected_logits).abs().max() <= TOL


def transformers_folder(tmp_path, registers: bool, swiglu: bool = False):
    config_class, model_class = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    )
    extra = {"num_register_tokens": 4} if registers else {}
    config = config_class(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=518,
        patch_size=14,
        use_swiglu_ffn=swiglu,
        **extra,
    )
    reference = randomize(model_class(config))
    reference.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", reference


@pytest.mark.parametrize("swiglu", [False, True])
def test_transformers_dinov2_with_registers_folder_matches_transformers(tmp_path, swiglu):
    folder, reference = transformers_folder(tmp_path, registers=True, swiglu=swiglu)
    conversion, _ = read_source(folder)
    assert conversion.source_format == "transformers" and conversion.config.use_swiglu_ffn == swiglu
    differences = max_token_difference(build_model(conversion), reference, sizes(14, 518))
    assert max(differences.values()) <= TOL, differences


def test_transformers_dinov2_folder_keeps_transformers_interpolation_or_takes_the_official_one(tmp_path, monkeypatch):
    folder, reference = transformers_folder(tmp_path, registers=False)
    # By default the converted model resizes as transformers' does (tests/test_conversion_interpolation.py) ...
    conversion, _ = read_source(folder)
    assert max(max_token_difference(build_model(conversion), reference, sizes(14, 518)).values()) <= TOL
    # ... with interpolation="dinov2", as DINOv2's official code: transformers agrees only at the native size ...
    conversion, _ = read_source(folder, interpolation="dinov2")
    model = build_model(conversion)
    assert max_token_difference(model, reference, [(518, 518)])[(518, 518)] <= TOL
    # ... and elsewhere the converted model follows the official algorithm, checked against timm running the
    # official resampler on the same weights.
    official = timm_vit.VisionTransformer(
        img_size=518,
        patch_size=14,
        embed_dim=128,
        depth=2,
        num_heads=2,
        init_values=1.0,
        num_classes=0,
        dynamic_img_size=True,
    )
    # The same weights in DINOv2's layout (the exact round trip of to_dinov2 is tested in test_conversion_errors).
    dinov2_layout = to_dinov2(model.state_dict(), conversion.config)
    dinov2_layout.pop("mask_token")
    official.load_state_dict(dinov2_layout)
    monkeypatch.setattr(timm_vit, "resample_abs_pos_embed", official_resample)
    differences = max_token_difference(model, official.eval(), sizes(14, 518)[1:])
    assert max(differences.values()) <= TOL, differences
    assert max(max_token_difference(model, reference, sizes(14, 518)[1:]).values()) > 1e-3


def test_official_reg4_matches_transformers(tmp_path):
    # The same official weights in transformers' on-disk layout (q/k/v split), loaded by transformers itself.
    state = random_official_state_dict("dinov2_vits14_reg4", **TINY)
    hf = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.register_tokens": state["register_tokens"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    for block in range(2):
        src, dst = f"blocks.{block}.", f"encoder.layer.{block}."
        for param in ("weight", "bias"):
            for index, part in enumerate(("query", "key", "value")):
                hf[f"{dst}attention.attention.{part}.{param}"] = state[f"{src}attn.qkv.{param}"].chunk(3)[index]
            hf[f"{dst}attention.output.dense.{param}"] = state[f"{src}attn.proj.{param}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hf[f"{dst}{name}.{param}"] = state[f"{src}{name}.{param}"]
        hf[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        hf[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    config = Dinov2WithRegistersConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=518,
        patch_size=14,
        num_register_tokens=4,
    )
    config.save_pretrained(tmp_path)
    save_file({key: value.contiguous() for key, value in hf.items()}, tmp_path / "model.safetensors")
    reference = Dinov2WithRegistersModel.from_pretrained(tmp_path).eval()
    conversion, _ = read_source_dict(state)
    differences = max_token_difference(build_model(conversion), reference, sizes(14, 518))
    assert max(differences.values()) <= TOL, differences


@pytest.mark.parametrize("kind, blocks", [("linear", 1), ("linear4", 4)])
def test_official_heads_match_timm_features(tmp_path, kind, blocks):
    state = random_official_state_dict("dinov2_vits14_reg4", hidden_size=128, num_hidden_layers=4)
    head = random_head_state_dict(128, blocks)
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    torch.save(head, tmp_path / f"dinov2_vits14_reg4_{kind}_head.pth")
    folder = convert(
        tmp_path / "dinov2_vits14_reg4_pretrain.pth",
        tmp_path / "out",
        head=tmp_path / f"dinov2_vits14_reg4_{kind}_head.pth",
        progress=False,
    )
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert model.config.id2label[0] == "tench, Tinca tinca" and model.config.classifier_num_layers == blocks
    reference = timm_reference(state, "dinov2-hub", model.config)
    for height, width in [(518, 518), (224, 308)]:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            _, intermediates = reference.forward_intermediates(
                pixels, indices=blocks, norm=True, return_prefix_tokens=True, output_fmt="NLC"
            )
            # DINOv2: CLS of the last `blocks` blocks (normed) + mean of the last block's normed patch tokens
            cls_tokens = [prefix[:, 0] for _, prefix in intermediates]
            features = torch.cat((*cls_tokens, intermediates[-1][0].mean(dim=1)), dim=-1)
            expected = F.linear(features, head["weight"], head["bias"])
            logits = model(pixel_values=pixels).logits
        assert (logits - expected).abs().max() <= TOL


@pytest.mark.slow
def test_real_vits14_reg4_shape_matches_timm(tmp_path):
    state = random_official_state_dict("dinov2_vits14_reg4")
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    folder = convert(tmp_path / "dinov2_vits14_reg4_pretrain.pth", tmp_path / "out", progress=False)
    from transformers import AutoModel

    from vitreg.conversion.checkpoints import read_folder_config

    provenance = json.loads((folder / "provenance.json").read_text())
    model = AutoModel.from_pretrained(folder).eval()
    assert model.num_parameters() == sum(value.numel() for value in state.values())
    assert read_folder_config(folder)["auto_map"]["AutoModel"].endswith("ViTRegModel")
    assert provenance["official_name"] == "dinov2_vits14_reg4"
    assert provenance["base_model"] == "facebook/dinov2-with-registers-small"
    reference = timm_reference(state, "dinov2-hub", model.config)
    differences = max_token_difference(model, reference, sizes(14, 518))
    assert max(differences.values()) <= TOL, differences


def test_transformers_classifier_folder_matches_transformers_logits(tmp_path):
    # Dinov2WithRegistersForImageClassification: linear head on cat(CLS, mean patch), i.e. DINOv2's linear head.
    from transformers import Dinov2WithRegistersForImageClassification

    config = Dinov2WithRegistersConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=518,
        patch_size=14,
        num_register_tokens=4,
        num_labels=5,
    )
    reference = randomize(Dinov2WithRegistersForImageClassification(config))
    reference.save_pretrained(tmp_path / "hf", max_shard_size="500KB")  # sharded on purpose
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    conversion, _ = read_source(tmp_path / "hf")
    model = build_model(conversion)
    assert model.config.id2label == reference.config.id2label and model.config.classifier_num_layers == 1
    for height, width in [(518, 518), (224, 308)]:
        pixels = torch.randn(2, 3, height, width)
        with torch.no_grad():
            difference = (model(pixel_values=pixels).logits - reference(pixel_values=pixels).logits).abs().max()
        assert difference <= TOL
