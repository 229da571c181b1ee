"""DINOv3 conversion: every token equal to transformers' DINOv3ViTModel and timm's Eva `*_dinov3` (random weights in
each one's own format, converted), the official hub layout, the exact way back, and one-line refusals of bad input.

The official research code (facebookresearch/dinov3) is not installable here: the official layout is checked against
transformers (its weights mapped by name below, independently of conversion/dinov3.py) and against timm (which reads
the official layout through its own `checkpoint_filter_fn`, what `--verify` does).
"""

import json
import math
import re

import pytest
import torch
from transformers import AutoModel

from vitreg.cli import main
from vitreg.conversion import convert, dinov3_shapes, random_dinov3_state_dict, write_random_dinov3_checkpoint
from vitreg.conversion.reference import max_token_difference
from vitreg.model_cards.registry import DINOV3_BACKBONES
from vitreg.modeling_vitreg.modeling_vitreg import rope_periods

SIZES = [(224, 224), (160, 256), (512, 512)]  # native, non-square, larger than training
TOLERANCE = 1e-5
DEPTH = 2
# Full-width layouts, shrunk in depth: a SwiGLU ViT-S+ and a GELU ViT-B.
LAYOUTS = {
    "vits16plus": dict(
        official="dinov3_vits16plus",
        timm="vit_small_plus_patch16_dinov3_qkvb",  # q_bias / v_bias
        transformers=dict(
            hidden_size=384, intermediate_size=1536, num_attention_heads=6, use_gated_mlp=True, hidden_act="silu"
        ),
    ),
    "vitb16": dict(
        official="dinov3_vitb16",
        timm="vit_base_patch16_dinov3",  # no qkv bias
        transformers=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    ),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (not the library's init, whose zero biases and constant LayerScale hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim > 1 and "token" not in name:
                parameter.copy_(noise * parameter[0].numel() ** -0.5)
            elif re.search(r"norm\w*\.weight$", name):
                parameter.copy_(1 + 0.1 * noise)
            elif "lambda1" in name or "gamma" in name:
                parameter.copy_(0.5 + 0.1 * noise)
            else:
                parameter.copy_(noise if "token" in name else 0.1 * noise)
    return model.eval()


def worst(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """Max abs difference over every token at every size, after checking each is within tolerance."""
    differences = max_token_difference(model.float().eval(), reference.eval(), SIZES)
    assert max(differences.values()) <= TOLERANCE, differences
    return max(differences.values())


# Official DINOv3 name -> transformers DINOv3ViTModel name (in memory), written here independently of the converter.
OFFICIAL_TO_TRANSFORMERS = [
    (r"cls_token", r"embeddings.cls_token"),
    (r"storage_tokens", r"embeddings.register_tokens"),
    (r"mask_token", r"embeddings.mask_token"),
    (r"patch_embed\.proj\.", r"embeddings.patch_embeddings."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"model.layer.\1.attention.o_proj."),
    (r"blocks\.(\d+)\.ls([12])\.gamma", r"model.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(?:w1)\.", r"model.layer.\1.mlp.gate_proj."),
    (r"blocks\.(\d+)\.mlp\.(?:w2|fc1)\.", r"model.layer.\1.mlp.up_proj."),
    (r"blocks\.(\d+)\.mlp\.(?:w3|fc2)\.", r"model.layer.\1.mlp.down_proj."),
    (r"blocks\.(\d+)\.", r"model.layer.\1."),
]


def transformers_from_official(state: dict[str, torch.Tensor], layout: dict) -> torch.nn.Module:
    """transformers' DINOv3ViTModel holding official-layout weights."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(num_hidden_layers=DEPTH, num_register_tokens=4, **layout["transformers"])
    weights = {}
    for key, value in state.items():
        if key == "rope_embed.periods" or key.endswith("bias_mask"):
            continue
        if match := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key):
            block, kind = match.groups()
            for part, chunk in zip("qkv", value.chunk(3)):
                if not (part == "k" and kind == "bias"):  # the key bias is masked away (0 in bias_mask)
                    weights[f"model.layer.{block}.attention.{part}_proj.{kind}"] = chunk
            continue
        for pattern, replacement in OFFICIAL_TO_TRANSFORMERS:
            key = re.sub(f"^{pattern}", replacement, key)
        weights[key] = value.reshape(1, 1, -1) if key == "embeddings.mask_token" else value
    model = DINOv3ViTModel(config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformers_folder_converts_with_every_token_equal(layout, tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    settings = LAYOUTS[layout]
    config = DINOv3ViTConfig(num_hidden_layers=DEPTH, num_register_tokens=4, **settings["transformers"])
    reference = randomize_(DINOv3ViTModel(config))
    reference.save_pretrained(tmp_path / "hf")
    # The CLI path, with its own check against transformers.
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--verify", "--no-progress"]) == 0
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert provenance["source_format"] == "dinov3-transformers" and provenance["license"] == "dinov3-license"
    assert provenance["parity"]["reference"] == "transformers" and provenance["parity"]["max_abs_diff"] <= TOLERANCE
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.mask_k_bias and model.config.position_embedding_type == "rope"
    assert model.config.use_swiglu_ffn == (layout == "vits16plus")
    worst(model, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_timm_checkpoint_converts_with_every_token_equal(layout, tmp_path):
    import timm
    from safetensors.torch import save_file

    settings = LAYOUTS[layout]
    reference = randomize_(timm.create_model(settings["timm"], pretrained=False, depth=DEPTH))
    if layout == "vits16plus":
        save_file(reference.state_dict(), tmp_path / "timm.safetensors")
        source = tmp_path / "timm.safetensors"
    else:
        torch.save(reference.state_dict(), tmp_path / "timm.pth")
        source = tmp_path / "timm.pth"
    folder = convert(source, tmp_path / "out", verify=True, progress=False)
    assert json.loads((folder / "provenance.json").read_text())["source_format"] == "dinov3-timm"
    model = AutoModel.from_pretrained(folder)
    assert model.config.num_attention_heads == settings["transformers"]["num_attention_heads"]
    assert model.config.qkv_bias == settings["timm"].endswith("_qkvb")
    worst(model, reference)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_official_layout_converts_with_every_token_equal(layout, tmp_path):
    settings = LAYOUTS[layout]
    source = write_random_dinov3_checkpoint(tmp_path / "official.pth", settings["official"], num_hidden_layers=DEPTH)
    folder = convert(source, tmp_path / "out", verify=True, progress=False)  # --verify: against timm
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["source_format"] == "dinov3-hub" and provenance["license"] == "dinov3-license"
    assert provenance["parity"]["reference"] == "timm" and provenance["parity"]["max_abs_diff"] <= TOLERANCE
    assert "official_name" not in provenance  # shrunk: no official model
    reference = transformers_from_official(torch.load(source, weights_only=True), settings)
    worst(AutoModel.from_pretrained(folder), reference)


ROUND_TRIPS = {
    "dinov3_vits16plus": dict(num_hidden_layers=2, hidden_size=128),  # SwiGLU w1/w2/w3
    "dinov3_vitb16": dict(num_hidden_layers=2, hidden_size=128),
    "dinov3_vitl16_sat493m": dict(num_hidden_layers=1, hidden_size=128),  # local_cls_norm
    "dinov3_vit7b16": dict(num_hidden_layers=1, hidden_size=256),  # head dim 128, SwiGLU aligned to 64, no qkv bias
}


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_export_round_trip_is_exact(name, tmp_path, capsys):
    source = write_random_dinov3_checkpoint(tmp_path / "src.pth", name, **ROUND_TRIPS[name])
    folder = convert(source, tmp_path / "out", progress=False)
    assert main(["convert", "--to", "official", str(folder), str(tmp_path / "back.pth")]) == 0
    original, back = torch.load(source, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(original)  # the official key order, loadable strictly
    assert all(torch.equal(back[key], original[key]) for key in original)
    assert main(["convert", "--to", "dinov2", str(folder), str(tmp_path / "v2.pth")]) == 1
    assert "--to dinov3" in capsys.readouterr().err


def test_shapes_of_every_official_backbone():
    for name, row in DINOV3_BACKBONES.items():
        shapes = dinov3_shapes(name)
        buffers = ("rope_embed.periods", "bias_mask")
        parameters = sum(torch.Size(shape).numel() for key, shape in shapes.items() if not key.endswith(buffers))
        assert parameters == row.count_parameters(), name
        assert list(shapes)[:4] == ["cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight"]
        assert shapes["rope_embed.periods"] == (row.head_dim // 4,)
        assert ("blocks.0.attn.qkv.bias_mask" in shapes) == row.qkv_bias
        assert ("local_cls_norm.weight" in shapes) == row.untie_global_and_local_cls_norm
    assert dinov3_shapes("dinov3_vit7b16")["blocks.39.mlp.w1.weight"] == (8192, 4096)
    assert dinov3_shapes("dinov3_vitb16") == dinov3_shapes("dinov3_vitb16_lvd1689m")


def bad_dinov3_inputs(tmp_path) -> dict[str, tuple[dict | bytes, str]]:
    """name -> (state dict or raw bytes, words the one-line error must contain)."""
    state = random_dinov3_state_dict("dinov3_vits16", hidden_size=64, num_hidden_layers=2)
    periods, bent = state["rope_embed.periods"], state["rope_embed.periods"].clone()
    bent[3] *= 1.5
    nan_mask, key_mask = state["blocks.1.attn.qkv.bias_mask"].clone(), torch.ones(192)
    nan_mask[5] = float("nan")
    torch.save(state, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    return {
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "wrong shape": (
            {**state, "blocks.1.attn.qkv.weight": torch.zeros(100, 64)},
            "blocks.1.attn.qkv.weight: shape [100, 64], expected [192, 64]",
        ),
        "missing key": ({k: v for k, v in state.items() if k != "blocks.1.norm2.bias"}, "missing keys"),
        "missing block": ({k: v for k, v in state.items() if not k.startswith("blocks.0.")}, "missing transformer"),
        "unknown key": ({**state, "blocks.0.attn.extra": torch.zeros(3)}, "unknown keys"),
        "rope: count": ({**state, "rope_embed.periods": periods[:3]}, "rope_embed.periods: 3 periods do not fit"),
        "rope: values": (
            {**state, "rope_embed.periods": bent},
            "rope_embed.periods: [1, 1.334, 1.778, 3.557, ...] match no",
        ),
        "rope: NaN": ({**state, "rope_embed.periods": periods * float("nan")}, "rope_embed.periods: holds non-finite"),
        "rope: absent": ({k: v for k, v in state.items() if k != "rope_embed.periods"}, "missing key rope_embed"),
        "mask: NaN": ({**state, "blocks.1.attn.qkv.bias_mask": nan_mask}, "blocks.1.attn.qkv.bias_mask: NaN"),
        "mask: key": ({**state, "blocks.0.attn.qkv.bias_mask": key_mask}, "blocks.0.attn.qkv.bias_mask: not 1 on"),
        "mask: absent": (
            {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.bias_mask"},
            "missing key blocks.1.attn.qkv.bias_mask",
        ),
    }


def test_bad_dinov3_inputs_give_one_line_and_leave_nothing(tmp_path, capsys):
    for name, (content, words) in bad_dinov3_inputs(tmp_path).items():
        path = tmp_path / "bad.pth"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        out = tmp_path / "out" / "model"
        assert main(["convert", str(path), str(out)]) == 1, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert words in err, (name, err)
        assert not (tmp_path / "out").exists(), name


def test_bad_timm_and_transformers_dinov3_inputs(tmp_path, capsys):
    import timm
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    state = timm.create_model("vit_small_plus_patch16_dinov3_qkvb", depth=2, embed_dim=64, num_heads=1).state_dict()
    torch.save({**state, "blocks.1.mlp.fc1_g.weight": torch.zeros(100, 64)}, tmp_path / "timm.pth")
    assert main(["convert", str(tmp_path / "timm.pth"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "blocks.1.mlp.fc1_g.weight + blocks.1.mlp.fc1_x.weight: shape [356, 64], expected [512, 64]" in err
    DINOv3ViTModel(DINOv3ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(
        tmp_path / "hf"
    )
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_attention_heads": None}))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 1
    assert "config.json: missing num_attention_heads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_num_heads_must_agree_with_the_periods(tmp_path, capsys):
    source = write_random_dinov3_checkpoint(tmp_path / "src.pth", "dinov3_vits16", hidden_size=64, num_hidden_layers=1)
    assert main(["convert", str(source), str(tmp_path / "out"), "--num-heads", "2"]) == 1
    assert "--num-heads 2 contradicts rope_embed.periods (1 heads)" in capsys.readouterr().err


def test_code_in_a_dinov3_pickle_is_refused_and_never_runs(tmp_path, capsys):
    from test_conversion_errors import Payload

    marker = tmp_path / "marker"
    state = random_dinov3_state_dict("dinov3_vits16", hidden_size=64, num_hidden_layers=1)
    torch.save({**state, "payload": Payload(marker)}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out")]) == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_periods_stored_in_bfloat16_are_kept_as_the_official_code_uses_them(tmp_path):
    from vitreg.conversion import read_source
    from vitreg.conversion.converter import export_official
    from vitreg.core.opening import open_model

    # The released weights hold bfloat16-rounded periods, which DINOv3's RopePositionEmbedding loads and computes with.
    state = random_dinov3_state_dict("dinov3_vits16", hidden_size=64, num_hidden_layers=1)
    rounded = state["rope_embed.periods"].bfloat16()
    assert not torch.equal(rounded.float(), state["rope_embed.periods"])
    torch.save({**state, "rope_embed.periods": rounded}, tmp_path / "bf16.pth")
    conversion, _ = read_source(tmp_path / "bf16.pth")
    config = conversion.config
    assert (config.rope_theta, config.num_attention_heads, config.rope_periods_dtype) == (100, 1, "bfloat16")
    assert any("bfloat16" in note for note in conversion.notes)
    torch.testing.assert_close(rope_periods(config), rounded.float(), rtol=0, atol=0)
    model, _, _ = open_model(tmp_path / "bf16.pth")  # converted in memory
    sin, _ = model.embeddings.rotary(32, 48, torch.device("cpu"))
    coords = torch.tensor([2 * 1.5 / 2 - 1, 2 * 2.5 / 3 - 1])  # the last patch's centre, as DINOv3 maps it
    angles = (2 * math.pi * coords[:, None] / rounded.float()[None, :]).flatten().tile(2)
    torch.testing.assert_close(sin[-1], torch.sin(angles), rtol=0, atol=1e-6)
    convert(tmp_path / "bf16.pth", tmp_path / "folder", progress=False)
    export_official(tmp_path / "folder", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back["rope_embed.periods"].dtype == torch.bfloat16 and torch.equal(back["rope_embed.periods"], rounded)


def test_an_official_file_name_and_shape_name_the_official_model(tmp_path):
    from vitreg.conversion.converter import provenance_of
    from vitreg.conversion.dinov3 import dinov3_config
    from vitreg.conversion.layouts import Conversion

    row = DINOV3_BACKBONES["dinov3_vitl16_sat493m"]
    official = Conversion(dinov3_config(row.name), {}, "dinov3-hub")
    provenance = provenance_of(tmp_path / row.pretrain_file, official, None, progress=False)
    assert (provenance.official_name, provenance.license) == (row.name, "dinov3-license")
    assert provenance.base_model == row.base_model
    lvd = Conversion(dinov3_config("dinov3_vitl16"), {}, "dinov3-hub")  # no local_cls_norm: not the SAT-493M model
    assert provenance_of(tmp_path / row.pretrain_file, lvd, None, progress=False).official_name is None


def test_periods_by_min_and_max_period_are_read_and_verify_says_why_it_cannot(tmp_path, capsys):
    from vitreg.conversion import read_source
    from vitreg.conversion.dinov3 import dinov3_config

    state = random_dinov3_state_dict("dinov3_vits16", hidden_size=64, num_hidden_layers=1)
    periods = dict(rope_theta=None, rope_min_period=0.5, rope_max_period=50.0)
    config = dinov3_config("dinov3_vits16", hidden_size=64, num_attention_heads=1, **periods)
    state["rope_embed.periods"] = rope_periods(config)
    torch.save(state, tmp_path / "src.pth")
    config = read_source(tmp_path / "src.pth")[0].config
    assert config.rope_theta is None
    assert (config.rope_min_period, config.rope_max_period) == (pytest.approx(0.5), pytest.approx(50.0))
    assert main(["convert", str(tmp_path / "src.pth"), str(tmp_path / "out"), "--verify"]) == 1
    assert "timm, whose DINOv3 model has no RoPE by min and max period" in capsys.readouterr().err


def test_a_converted_dinov3_folder_preprocesses_as_dinov3(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    write_random_dinov3_checkpoint(tmp_path / "s.pth", "dinov3_vits16", hidden_size=64, num_hidden_layers=1)
    convert(tmp_path / "s.pth", tmp_path / "folder", progress=False)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "folder")
    # DINOv3's README and transformers' DINOv3ViTImageProcessor: the whole image to 224 x 224, bilinear, no crop.
    assert (processor.size["height"], processor.size["width"], processor.do_center_crop) == (224, 224, False)
    assert processor.resample == 2
    pixels = processor(Image.new("RGB", (500, 300)), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
