"""DINOv3 as a first-class ViTReg family: the registry rows, the cards (DINOv3 licence, citation, published numbers),
and every tool on a DINOv3-layout folder (RoPE, 4 registers, patch 16, masked key bias, untied CLS norm; SwiGLU and
MLP): `vitreg analyze`, `vitreg extract`, `vitreg export onnx`, the pipeline, `Trainer` and `AutoBackbone`."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import randomize_
from huggingface_hub import ModelCard
from test_extract import array
from test_model_cards import RUNNER, serve_from_offline_cache

from vitreg import model_cards
from vitreg.core.errors import UserError
from vitreg.core.provenance import Parity, Provenance
from vitreg.model_cards import registry, save_model_folder
from vitreg.model_cards.card import EXAMPLE_IMAGE_URL, build_card
from vitreg.model_cards.publish import check_card
from vitreg.modeling_vitreg import ViTRegConfig, ViTRegModel

CONVERTED = Provenance(
    kind="converted",
    official_name="dinov3_vitb16_lvd1689m",
    source_file="dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    source_sha256="3" * 64,
    source_format="dinov3-hub",
    license=registry.DINOV3_LICENSE,
    vitreg_version="0.2.0",
    parity=Parity(reference="transformers", max_abs_diff=2.5e-06, image_size=(224, 224)),
)
# MODEL_CARD.md's IN-ReaL and ADE20k of the LVD-1689M ViTs, and the README's rounded parameter counts.
PUBLISHED = {
    "dinov3_vits16": (87.0, 47.0, 21),
    "dinov3_vits16plus": (88.0, 48.8, 29),
    "dinov3_vitb16": (89.3, 51.8, 86),
    "dinov3_vitl16": (90.2, 54.9, 300),
    "dinov3_vith16plus": (90.3, 54.8, 840),
    "dinov3_vit7b16": (90.4, 55.9, 6716),
}


def dinov3_config(**overrides) -> ViTRegConfig:
    """A tiny DINOv3-layout ViTReg: RoPE, 4 registers, patch 16, masked key bias, untied CLS norm, SwiGLU."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=2.0,
        use_swiglu_ffn=True,
        patch_size=16,
        image_size=64,
        num_register_tokens=4,
        layerscale_value=0.5,
        layer_norm_eps=1e-5,
        position_embedding_type="rope",
        rope_rescale_coords=2.0,
        mask_k_bias=True,
        untie_cls_and_patch_norms=True,
    )
    return ViTRegConfig(**{**fields, **overrides})


def save_dinov3(folder, provenance: Provenance = CONVERTED, **overrides):
    """A random DINOv3-layout ViTRegModel saved as every ViTReg folder is (weights, remote code, processor, card)."""
    torch.manual_seed(0)
    model = randomize_(ViTRegModel(dinov3_config(**overrides)))
    return save_model_folder(model, folder, provenance)


# --- registry -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(registry.DINOV3_BACKBONES))
def test_every_dinov3_row_has_its_published_facts(name):
    row = registry.DINOV3_BACKBONES[name]
    assert registry.official_row(name) is row and row.family == "dinov3"
    assert name == f"{row.hub_name}_{row.weights.lower()}" and row.weights in registry.DINOV3_WEIGHT_SETS
    assert row.num_register_tokens == 4 and row.patch_size == 16
    assert row.head_dim == (128 if row.size == "7B" else 64)
    assert re.fullmatch(rf"{row.hub_name}_pretrain_{row.weights.lower()}-[0-9a-f]{{8}}\.pth", row.pretrain_file)
    assert registry.identify_dinov3_file(row.pretrain_file) is row
    assert registry.identify_dinov3_file(row.pretrain_file.replace(row.file_hash, "00000000")) is None
    assert row.base_model == f"facebook/{row.hub_name.replace('_', '-')}-pretrain-{row.weights.lower()}"
    # The count from the shapes agrees with the README's rounded one (21M: 21.6M, rounded down there).
    assert abs(row.params_millions - row.published_params_millions) / row.published_params_millions < 0.03
    assert row.published_params_millions == PUBLISHED[row.hub_name][2]
    if row.weights == "LVD1689M":
        in_real, ade20k, _ = PUBLISHED[row.hub_name]
        assert [(r.benchmark.split()[0], r.value) for r in row.results] == [("ImageNet-ReaL", in_real),
                                                                           ("ADE20k", ade20k)]  # fmt: skip
    else:  # MODEL_CARD.md gives GEO-Bench means for the satellite weights, no IN-ReaL or ADE20k
        names = [r.benchmark.split(",")[0] for r in row.results]
        assert names == ["GEO-Bench classification", "GEO-Bench segmentation"]
        assert all(r.task_type is None for r in row.results)  # no Hub dataset: card text only


def test_registry_rows_build_the_official_dinov3_models():
    # The released parameter counts pin every shape: SwiGLU widths (7B aligned to 64), no qkv bias in the 7B,
    # the training-only local CLS norm of ViT-L SAT-493M and the 7Bs.
    widths = {"S": 1536, "S+": 1536, "B": 3072, "L": 4096, "H+": 5120, "7B": 8192}
    for row in registry.DINOV3_BACKBONES.values():
        config = ViTRegConfig(**row.config_fields())
        with torch.device("meta"):
            model = ViTRegModel(config)
        # The saved tensors: the parameters, and local_cls_norm, which ViTReg keeps as frozen buffers (the official
        # model counts it as a parameter its trainer alone updates).
        assert sum(t.numel() for t in model.state_dict().values()) == row.count_parameters(), row.name
        assert config.mlp_hidden_size == row.mlp_hidden_size == widths[row.size]
        assert "embeddings.position_embeddings" not in model.state_dict()
        assert ("local_cls_norm.weight" in model.state_dict()) == row.untie_global_and_local_cls_norm
    assert len(registry.OFFICIAL_BACKBONES) == 8 and registry.official_row("dinov2_vits14").family == "dinov2"
    with pytest.raises(KeyError, match="dinov3_vitx16_lvd1689m"):
        registry.official_row("dinov3_vitx16_lvd1689m")


# --- cards ----------------------------------------------------------------------------------------------------------


def test_a_converted_dinov3_card_carries_its_licence_numbers_and_citation(tmp_path):
    folder = save_dinov3(tmp_path / "dinov3")
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.license, data.license_name, data.license_link) == ("other", "dinov3-license",
                                                                     registry.DINOV3_LICENSE_URL)  # fmt: skip
    assert data.tags == ["vitreg", "vision", "registers", "dinov3", "rope"]
    assert data.base_model == "facebook/dinov3-vitb16-pretrain-lvd1689m"
    assert data.model_name == "dinov3-vitb16-lvd1689m"
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("ImageNet-ReaL", "accuracy", 89.3),
        ("ADE20k", "mean_iou", 51.8),
    ]
    text = card.text
    assert "DINOv3 License" in text and registry.DINOV3_LICENSE_URL in text and "copy of the agreement" in text
    assert "released by Meta under the Apache" not in text  # only the model code is Apache
    assert "2508.10104" in text and "2304.07193" not in text and "2309.16588" in text
    assert "| ImageNet-ReaL top-1 (IN-ReaL) | 89.3 % |" in text
    assert "| ADE20k semantic segmentation mIoU | 51.8 % |" in text
    assert "`dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth`" in text and "3" * 64 in text
    assert "LVD-1689M" in text and "distilled from DINOv3 ViT-7B/16" in text
    assert "rotary embeddings (RoPE)" in text and "rescale 2" in text and "interpolated bicubic" not in text
    assert "rotary position embeddings need no interpolation" in text
    config = json.loads((folder / "config.json").read_text())
    assert check_card(folder, config) is not None  # what `vitreg publish` checks before uploading
    card.data.license_link = None  # the Hub wants a name and a link with `license: other`
    card.save(folder / "README.md")
    with pytest.raises(UserError, match="license 'other' without license_name and license_link"):
        check_card(folder, config)


@pytest.mark.parametrize(
    "provenance, license, tags, in_text, not_in_text",
    [
        # The satellite ViT-L: GEO-Bench means in the text, nothing for model-index.
        (dataclasses.replace(CONVERTED, official_name="dinov3_vitl16_sat493m"), "other", ["dinov3", "rope"],
         ["GEO-Bench classification, mean of 6 tasks | 79.6 |", "SAT-493M"], ["IN-ReaL"]),
        # A transformers DINOv3ViT folder of unknown origin whose converter left the licence at its default: the
        # weights are DINOv3's all the same.
        (Provenance(kind="converted", source_format="dinov3-transformers", source_file="model.safetensors"), "other",
         ["dinov3", "rope"], ["a transformers DINOv3ViT checkpoint", "DINOv3 License"], ["## Results"]),
        # A RoPE ViT trained from scratch by `vitreg pretrain`: Apache, like every trained folder.
        (Provenance(kind="trained", objective="dinov2", config_file="rope.yaml", steps=3), "apache-2.0",
         ["dinov2", "rope"], ["Apache License 2.0", "rotary embeddings (RoPE)"], ["DINOv3 License", "2508.10104"]),
    ],
)  # fmt: skip
def test_licence_follows_the_weights(tmp_path, provenance, license, tags, in_text, not_in_text):
    (tmp_path / "config.json").write_text(json.dumps(dinov3_config().to_dict()))
    card = build_card(tmp_path, provenance)
    assert card.data.license == license and card.data.tags == ["vitreg", "vision", "registers", *tags]
    assert (card.data.license_name == "dinov3-license") == (license == "other")
    assert all(text in card.text for text in in_text), [text for text in in_text if text not in card.text]
    assert not any(text in card.text for text in not_in_text)


def test_the_dinov3_cards_snippets_run(tmp_path, photos):
    """The card's two snippets, run in a fresh interpreter without the vitreg package, give the model's tokens."""
    repo_id = "vitreg-test/tiny-dinov3"
    folder = save_dinov3(tmp_path / "dinov3")
    model_cards.write_card(folder, model_cards.read_provenance(folder), repo_id=repo_id)
    serve_from_offline_cache(folder, tmp_path / "hf_home", repo_id)
    image_path = tmp_path / "chelsea.png"
    photos[1].save(image_path)
    text = (folder / "README.md").read_text()
    blocks = [code.replace(EXAMPLE_IMAGE_URL, str(image_path)) for code in re.findall(r"```python\n(.*?)```", text,
                                                                                       flags=re.DOTALL)]  # fmt: skip
    assert len(blocks) == 2
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, str(model_cards.__path__[0])],
        input=json.dumps(blocks), env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline_run, features_run = json.loads(done.stdout.split("RESULTS ", 1)[1])

    from transformers import AutoImageProcessor

    pixels = AutoImageProcessor.from_pretrained(folder)(images=photos[1].convert("RGB"), return_tensors="pt")
    with torch.no_grad():
        expected = ViTRegModel.from_pretrained(folder).eval()(**pixels)
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(pipeline_run["tokens"]), expected.last_hidden_state[0], **close)
    assert len(pipeline_run["tokens"]) == 1 + 4 + 14 * 14  # DINOv3's 201 tokens at 224 px
    torch.testing.assert_close(torch.tensor(pipeline_run["embedding"]), expected.pooler_output[0], **close)
    torch.testing.assert_close(torch.tensor(features_run["registers"]), expected.register_tokens, **close)
    patch_map = torch.tensor(features_run["patch_map"])
    torch.testing.assert_close(patch_map, expected.patch_tokens.reshape(1, 14, 14, -1), **close)


# --- tools on a DINOv3-layout folder --------------------------------------------------------------------------------

VARIANTS = {
    # S+/H+/7B-like: SwiGLU, untied CLS norm, masked key bias, train-time rescale
    "swiglu": dict(),
    # S/B/L-like MLP, with the SAT-493M ViT-L's training-only local CLS norm, the "max" coordinate normalisation and
    # every train-time augmentation
    "mlp": dict(use_swiglu_ffn=False, untie_global_and_local_cls_norm=True, rope_normalize_coords="max",
                rope_shift_coords=0.1, rope_jitter_coords=1.2),
}  # fmt: skip
PHOTOS = ("astronaut", "chelsea", "coffee")


@pytest.fixture(scope="module", params=list(VARIANTS))
def dinov3_folder(request, tmp_path_factory):
    """A saved DINOv3-layout folder of each variant, its model in eval mode, and three real photos."""
    from vitreg.core import sample_photos

    root = tmp_path_factory.mktemp(f"dinov3-{request.param}")
    folder = save_dinov3(root / "model", **VARIANTS[request.param])
    sample_photos(root / "photos", PHOTOS, max_side=160)
    return folder, ViTRegModel.from_pretrained(folder).eval(), root / "photos"


def test_export_onnx_is_exact_at_sizes_never_traced(dinov3_folder, tmp_path, capsys):
    """RoPE is arithmetic on the grid size: `vitreg export onnx --dynamic` gives one graph, equal to PyTorch at any
    size (it traces at the config's 64 px and checks 112x32 itself)."""
    from vitreg.cli import main
    from vitreg.export import ONNXRuntimeModel

    folder, model, _ = dinov3_folder
    assert main(["export", "onnx", str(folder), str(tmp_path / "model.onnx"), "--dynamic"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote {tmp_path / 'model.onnx'}")
    runtime = ONNXRuntimeModel(tmp_path / "model.onnx")
    names = ["last_hidden_state", "pooler_output", "register_tokens", "patch_tokens"]
    for size in [(64, 64), (160, 96), (48, 272)]:  # the traced size, then two sizes the export never saw
        pixel_values = torch.randn(2, 3, *size)
        with torch.inference_mode():
            expected = model(pixel_values)
        got = runtime(pixel_values)
        for name in names:
            assert got[name].shape == tuple(expected[name].shape), name
            np.testing.assert_allclose(got[name], expected[name].numpy(), atol=1e-4, rtol=0, err_msg=f"{name} {size}")
    assert got["register_tokens"].shape == (2, 4, 32) and got["patch_tokens"].shape == (2, 3 * 17, 32)


def test_pipeline_and_extract_give_the_models_tokens(dinov3_folder, tmp_path, photos):
    from PIL import Image
    from transformers import AutoImageProcessor, pipeline

    from vitreg.extract import extract_features, load_features

    folder, model, photo_folder = dinov3_folder
    extractor = pipeline("image-feature-extraction", model=str(folder))
    processor = AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = model(**processor(photos[:2], return_tensors="pt"))
    tokens = extractor(photos[:2], return_tensors=True)
    pooled = extractor(photos[:2], pool=True, return_tensors=True)
    for i in range(2):
        assert tokens[i].shape == (1, 1 + 4 + 14 * 14, 32)
        torch.testing.assert_close(tokens[i][0], expected.last_hidden_state[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled[i][0], expected.pooler_output[i], atol=1e-5, rtol=0)  # cls_norm's CLS

    summary = extract_features(folder, photo_folder, tmp_path / "features", what="cls,patch,registers,pooled",
                               batch_size=2, workers=0, progress=False)  # fmt: skip
    assert summary["grid"] == [14, 14] and summary["rows"] == 3 and summary["num_register_tokens"] == 4
    features = load_features(tmp_path / "features")
    columns = {name: array(features, name) for name in ("cls", "registers", "patch", "pooled")}
    for row, name in enumerate(features["id"]):
        reference = np.asarray(extractor(Image.open(photo_folder / name))[0])  # [1 + 4 + 196, 32]
        assert np.abs(columns["cls"][row] - reference[0]).max() <= 1e-4
        assert np.abs(columns["registers"][row] - reference[1:5]).max() <= 1e-4
        assert np.abs(columns["patch"][row] - reference[5:]).max() <= 1e-4  # registers never among the patches
        assert np.abs(columns["pooled"][row] - reference[0]).max() <= 1e-4
    # Intermediate blocks are normed as DINOv3 norms them: the CLS and registers by cls_norm, patches by the norm.
    extract_features(folder, photo_folder, tmp_path / "layers", what="cls,patch", layers=[0, 1], workers=0,
                     progress=False)  # fmt: skip
    layers = load_features(tmp_path / "layers")
    pixel_values = processor(Image.open(photo_folder / layers["id"][0]), return_tensors="pt")["pixel_values"]
    layer_cls, layer_patches = array(layers, "cls")[0], array(layers, "patch")[0]  # [2, D], [2, 196, D]
    with torch.no_grad():
        _, kept = model.forward_blocks(pixel_values, keep=[1, 2])
        patches, cls_tokens = zip(*model.get_intermediate_layers(pixel_values, n=2, return_class_token=True))
    for block in range(2):
        assert np.abs(layer_cls[block] - cls_tokens[block][0].numpy()).max() <= 1e-5
        assert np.abs(layer_cls[block] - model.cls_norm(kept[block][0, 0]).detach().numpy()).max() <= 1e-5
        assert np.abs(layer_patches[block] - patches[block][0].numpy()).max() <= 1e-5
    # --image-size resizes the whole image as DINOv3 does (no crop): 96 px is a 6 x 6 grid.
    summary = extract_features(folder, photo_folder, tmp_path / "small", what="patch", image_size=96, workers=0,
                               progress=False)  # fmt: skip
    assert summary["grid"] == [6, 6]
    photo = Image.open(photo_folder / features["id"][0])
    small = processor(photo, size={"height": 96, "width": 96}, return_tensors="pt")
    with torch.no_grad():
        expected_patches = model(**small).patch_tokens[0].numpy()
    assert np.abs(array(load_features(tmp_path / "small"), "patch")[0] - expected_patches).max() <= 1e-4


def test_analyze_attention_is_the_rope_models_own(dinov3_folder, tmp_path):
    """The report's CLS attention is recomputed from the last block's queries and keys: rotated, key bias masked."""
    from vitreg.analysis import analyze
    from vitreg.analysis.loading import preprocess
    from vitreg.core.images import image_processor

    folder, model, photo_folder = dinov3_folder
    images = sorted(photo_folder.iterdir())
    result = analyze(model, image_processor(), [str(images[0])], image_size=96, progress=False)
    (analysis,) = result.images
    from PIL import Image

    pixel_values = preprocess(image_processor(), Image.open(images[0]).convert("RGB"), 16, 96)  # [1, 3, 96, 96]
    with torch.no_grad():
        outputs = model(pixel_values, output_attentions=True)
    attention = outputs.attentions[-1][0, :, 0]  # [heads, 1 + 4 + 36] from the model's eager attention
    assert analysis.grid == (6, 6) and analysis.register_norms.shape == (4,)
    np.testing.assert_allclose(analysis.cls_attention, attention[:, 5:].reshape(2, 6, 6).numpy(), atol=1e-6)
    np.testing.assert_allclose(analysis.cls_attention_registers, attention[:, 1:5].numpy(), atol=1e-6)
    np.testing.assert_allclose(analysis.norms, outputs.patch_tokens[0].norm(dim=-1).reshape(6, 6).numpy(), rtol=1e-5)

    from vitreg.cli import main

    assert main(["analyze", str(folder), str(photo_folder), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["images"]) == 3 and all(len(r["register_norms"]) == 4 for r in report["images"])
    assert report["images"][0]["grid"] == [14, 14] and report["summary"]["attention_on_registers"] > 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_auto_backbone_feature_maps(dinov3_folder):
    from transformers import AutoBackbone

    from vitreg.modeling_vitreg import ViTRegBackbone

    folder, model, _ = dinov3_folder
    config = ViTRegConfig.from_pretrained(folder, out_features=["stage1", "stage2"])
    backbone = AutoBackbone.from_config(config)
    assert isinstance(backbone, ViTRegBackbone)
    missing, unexpected = backbone.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    loaded = ViTRegBackbone.from_pretrained(folder, out_features=["stage1", "stage2"]).eval()
    pixel_values = torch.randn(2, 3, 64, 96)  # 4 rows x 6 columns
    with torch.no_grad():
        maps = backbone.eval()(pixel_values).feature_maps
        expected = model.get_intermediate_layers(pixel_values, n=2, reshape=True)
        final = model(pixel_values).patch_tokens
        assert all(torch.equal(a, b) for a, b in zip(maps, loaded(pixel_values).feature_maps))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6)] * 2
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), final, atol=1e-5, rtol=0)


def test_trainer_fine_tunes_a_dinov3_classifier(dinov3_folder, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    from vitreg.modeling_vitreg import ViTRegForImageClassification

    folder, backbone, _ = dinov3_folder
    model = ViTRegForImageClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(model.vitreg.embeddings.register_tokens, backbone.embeddings.register_tokens)
    generator = torch.Generator().manual_seed(0)
    pixel_values, labels = torch.randn(12, 3, 48, 48, generator=generator), torch.arange(12) % 3

    class Images(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return {"pixel_values": pixel_values[index], "labels": labels[index]}

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=12, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=Images())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    # Training never reads the mask token (no masks) or DINOv3's local-crop CLS norm; everything else learns.
    assert set(unchanged) <= {"vitreg.embeddings.mask_token", "vitreg.local_cls_norm.weight",
                              "vitreg.local_cls_norm.bias"}, unchanged  # fmt: skip


def test_test_time_registers_on_a_rope_model(dinov3_folder):
    """A test-time register joins the unrotated prefix; the register neuron's patch activations move into it."""
    from vitreg.registers.apply import with_test_time_registers

    _, model, _ = dinov3_folder
    shifted = with_test_time_registers(model, [[1, 3]])
    pixel_values = torch.randn(2, 3, 48, 80)
    captured = {}
    hook = shifted.encoder.layer[1].mlp.register_shift.register_forward_hook(
        lambda module, inputs, output: captured.update(output=output)
    )
    with torch.no_grad():
        out = shifted(pixel_values)
    hook.remove()
    assert out.register_tokens.shape == (2, 5, 32) and out.patch_tokens.shape == (2, 15, 32)
    assert torch.isfinite(out.last_hidden_state).all()
    neuron = captured["output"][..., 3]  # [B, 1 + 4 + 1 + 15]
    assert (neuron[:, 6:] == 0).all() and (neuron[:, 5] != 0).all()
