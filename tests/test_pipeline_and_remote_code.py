"""Folders written by `vitreg.model_cards.save_model_folder`: image processor, pipelines, and remote code from an
offline Hub cache in a Python where the ViTReg package cannot be imported."""

import json
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from conftest import max_diff, randomize_, tiny_config
from transformers import AutoImageProcessor, pipeline

from vitreg.core.provenance import Provenance
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegBackbone, ViTRegForImageClassification, ViTRegModel

CROP = 56  # 4 x 4 patches of 14 px: small enough to be fast, large enough to interpolate positions
LABELS = {0: "astronaut", 1: "cat", 2: "mug", 3: "rocket"}
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    """A tiny ViTRegForImageClassification with named labels, saved as ViTReg saves every model."""
    torch.manual_seed(0)
    config = tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = randomize_(ViTRegForImageClassification(config))
    folder = tmp_path_factory.mktemp("models") / "vitreg-tiny"
    save_model_folder(model, folder, Provenance(kind="random", name="vitreg-tiny"), crop_size=CROP)
    return folder


def test_folder_is_a_complete_hub_repository(classifier_folder):
    names = {p.name for p in classifier_folder.iterdir()}
    expected = {"config.json", "model.safetensors", "configuration_vitreg.py", "modeling_vitreg.py"}
    assert expected | {"preprocessor_config.json", "README.md"} <= names
    config = json.loads((classifier_folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vitreg.ViTRegConfig",
        "AutoModel": "modeling_vitreg.ViTRegModel",
        "AutoModelForImageClassification": "modeling_vitreg.ViTRegForImageClassification",
        "AutoBackbone": "modeling_vitreg.ViTRegBackbone",
    }


def test_auto_image_processor_has_dinov2_preprocessing(classifier_folder, photos):
    processor = AutoImageProcessor.from_pretrained(classifier_folder)
    assert type(processor).__name__.startswith("BitImageProcessor")
    assert processor.crop_size == {"height": CROP, "width": CROP}
    assert processor.size == {"shortest_edge": 64}  # 256 / 224 of the crop
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    pixels = processor(photos, return_tensors="pt").pixel_values
    assert pixels.shape == (4, 3, CROP, CROP)
    # ImageNet-normalised photos: roughly zero mean, unit spread, within the normalised [0, 1] range.
    assert -1.0 < pixels.mean() < 1.0 and 0.5 < pixels.std() < 1.5
    assert pixels.min() >= -0.485 / 0.229 - 1e-4 and pixels.max() <= (1 - 0.406) / 0.225 + 1e-4


def test_feature_extraction_pipeline_with_and_without_pooling(classifier_folder, photos):
    extractor = pipeline("image-feature-extraction", model=str(classifier_folder))
    assert type(extractor.model) is ViTRegModel  # the classifier checkpoint loads as the bare encoder
    model = ViTRegModel.from_pretrained(classifier_folder).eval()
    processor = AutoImageProcessor.from_pretrained(classifier_folder)
    with torch.no_grad():
        expected = model(**processor(photos, return_tensors="pt"))
    tokens = extractor(photos, return_tensors=True)
    pooled = extractor(photos, pool=True, return_tensors=True)
    assert len(tokens) == len(pooled) == 4
    for i in range(4):
        assert tokens[i].shape == (1, 1 + 4 + 16, 32)  # CLS, 4 registers, 4 x 4 patches
        assert max_diff(tokens[i][0], expected.last_hidden_state[i]) <= 1e-5
        assert max_diff(pooled[i][0], expected.pooler_output[i]) <= 1e-5
        assert max_diff(pooled[i][0], tokens[i][0, 0]) <= 1e-5  # pooled = CLS
    as_lists = extractor(photos[0])  # default: nested Python lists
    assert len(as_lists[0]) == 21 and len(as_lists[0][0]) == 32


def test_image_classification_pipeline_uses_id2label(classifier_folder, photos):
    classifier = pipeline("image-classification", model=str(classifier_folder), top_k=4)
    model = ViTRegForImageClassification.from_pretrained(classifier_folder).eval()
    processor = AutoImageProcessor.from_pretrained(classifier_folder)
    with torch.no_grad():
        probabilities = model(**processor(photos[1], return_tensors="pt")).logits.softmax(-1)[0]
    predictions = classifier(photos[1])
    assert {p["label"] for p in predictions} == set(LABELS.values())
    for prediction in predictions:
        label_id = model.config.label2id[prediction["label"]]
        assert prediction["score"] == pytest.approx(probabilities[label_id].item(), abs=1e-5)


REMOTE_SCRIPT = """
import sys
sys.path.append(sys.argv[1])  # site-packages only: no .pth files, so no editable install of ViTReg
for name in ("modeling_vitreg", "vitreg"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(name + " is importable: the test would prove nothing")

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

repo = "org/vitreg-tiny"
pixels = torch.load(sys.argv[2], weights_only=True)
config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
classifier = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
# AutoBackbone.from_pretrained asks the Hub whether the repo exists (transformers 5.24), so offline the class
# comes from the same auto_map entry that AutoBackbone would follow.
backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], repo)
backbone = backbone_class.from_pretrained(repo, out_features=["stage1", "stage2"]).eval()
extractor = pipeline("image-feature-extraction", model=repo, trust_remote_code=True)
labeller = pipeline("image-classification", model=repo, trust_remote_code=True, top_k=1)
with torch.no_grad():
    out = model(pixels)
    maps = backbone(pixels).feature_maps
    results = {
        "last_hidden_state": out.last_hidden_state,
        "register_tokens": out.register_tokens,
        "logits": classifier(pixels).logits,
        "stage1": maps[0],
        "stage2": maps[1],
        "pipeline_pooled": extractor(sys.argv[4], pool=True, return_tensors=True)[0],
    }
save_file({k: v.contiguous() for k, v in results.items()}, sys.argv[3])
print("MODULES", type(model).__module__, type(classifier).__module__, backbone_class.__module__)
print("LABEL", labeller(sys.argv[4])[0]["label"])
"""


def offline_hub_cache(folder, hf_home, repo="org/vitreg-tiny"):
    """Lay `folder` out as huggingface_hub's cache: models--org--name/{refs/main, snapshots/<rev>/...}."""
    cache = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, cache / "snapshots" / REVISION)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(REVISION)


def test_remote_code_from_offline_hub_cache_without_the_package(classifier_folder, photos, tmp_path):
    offline_hub_cache(classifier_folder, tmp_path / "hf_home")
    pixels = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(3))
    torch.save(pixels, tmp_path / "pixels.pt")
    photos[1].save(tmp_path / "cat.png")
    (tmp_path / "remote.py").write_text(textwrap.dedent(REMOTE_SCRIPT))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-I", "-S", str(tmp_path / "remote.py"), sysconfig.get_paths()["purelib"]]
    command += [str(tmp_path / "pixels.pt"), str(tmp_path / "out.safetensors"), str(tmp_path / "cat.png")]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # The classes came from the cached repository's copy of the code, not from this checkout.
    modules = next(line for line in done.stdout.splitlines() if line.startswith("MODULES")).split()[1:]
    assert all(module.startswith("transformers_modules.") for module in modules), modules

    from safetensors.torch import load_file

    remote = load_file(tmp_path / "out.safetensors")
    model = ViTRegModel.from_pretrained(classifier_folder).eval()
    classifier = ViTRegForImageClassification.from_pretrained(classifier_folder).eval()
    backbone = ViTRegBackbone.from_pretrained(classifier_folder, out_features=["stage1", "stage2"]).eval()
    extractor = pipeline("image-feature-extraction", model=str(classifier_folder))
    labeller = pipeline("image-classification", model=str(classifier_folder), top_k=1)
    with torch.no_grad():
        out = model(pixels)
        maps = backbone(pixels).feature_maps
        assert torch.equal(remote["last_hidden_state"], out.last_hidden_state)
        assert torch.equal(remote["register_tokens"], out.register_tokens)
        assert torch.equal(remote["logits"], classifier(pixels).logits)
        assert torch.equal(remote["stage1"], maps[0]) and torch.equal(remote["stage2"], maps[1])
        assert remote["stage2"].shape == (2, 32, 2, 3)
    local_pooled = extractor(str(tmp_path / "cat.png"), pool=True, return_tensors=True)[0]
    assert max_diff(remote["pipeline_pooled"], local_pooled) <= 1e-6
    label = next(line for line in done.stdout.splitlines() if line.startswith("LABEL")).split(maxsplit=1)[1]
    assert label == labeller(str(tmp_path / "cat.png"))[0]["label"]
    assert label in LABELS.values()
