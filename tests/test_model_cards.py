"""Model cards: metadata read back with ModelCard.load, the official registry, and the card's snippets executed
against the folder served from an offline Hub cache, as a user without the vitreg package would run them."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor

from vitreg import model_cards
from vitreg.core.errors import UserError
from vitreg.core.provenance import PROVENANCE_FILE, Parity, Provenance
from vitreg.model_cards import registry, save_model_folder
from vitreg.model_cards.card import EXAMPLE_IMAGE_URL, UNPUBLISHED_REPO_ID, build_card, read_provenance
from vitreg.modeling_vitreg import ViTRegForImageClassification, ViTRegModel

CONVERTED = Provenance(
    kind="converted",
    official_name="dinov2_vitb14_reg4",
    source_file="dinov2_vitb14_reg4_pretrain.pth",
    source_sha256="5" * 64,
    source_format="dinov2-hub",
    vitreg_version="0.1.0",
    parity=Parity(reference="timm", max_abs_diff=3.25e-06, image_size=(224, 224)),
)
WITH_HEAD = dataclasses.replace(CONVERTED, head_file="dinov2_vitb14_reg4_linear4_head.pth", head_sha256="7" * 64)
TRAINED = Provenance(
    kind="trained",
    objective="supervised",
    config_file="tiny.yaml",
    steps=120,
    final_loss=2.71828,
    datasets=["six-scikit-image-photos"],
    num_processes=2,
    license="mit",
)
RANDOM = Provenance(kind="random")
# The published ImageNet-1k top-1 of /work/shared/reference/dinov2-checkpoints.md (without / with registers).
PUBLISHED_TOP1 = {"s": (81.1, 80.8), "b": (84.5, 84.4), "l": (86.3, 86.5), "g": (86.5, 87.0)}
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"  # snapshot folders are named by 40-hex commit ids


def save(tmp_path: Path, name: str, provenance: Provenance, classifier: bool = False) -> Path:
    """A tiny ViTReg folder written the way every ViTReg folder is: through vitreg.model_cards.save_model_folder."""
    if classifier:
        config = tiny_config(num_labels=6, classifier_num_layers=2, id2label={i: f"class {i}" for i in range(6)})
        model = ViTRegForImageClassification(config)
    else:
        model = ViTRegModel(tiny_config())
    return save_model_folder(model.eval(), tmp_path / name, provenance)


def test_metadata_round_trip_of_an_official_backbone(tmp_path):
    folder = save(tmp_path, "backbone", CONVERTED)
    data = ModelCard.load(folder / "README.md").data
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-feature-extraction"
    assert data.tags == ["vitreg", "vision", "registers", "dinov2"]
    assert data.base_model == "facebook/dinov2-with-registers-base"
    assert data.datasets is None  # LVD-142M is not on the Hub
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.metric_type) == (
        "image-classification",
        "ILSVRC/imagenet-1k",
        "accuracy",
    )
    assert result.metric_value == 84.4
    assert data.model_name == "dinov2-vitb14-reg4"
    assert read_provenance(folder) == CONVERTED


def test_card_body_records_source_checksum_parity_and_citations(tmp_path):
    text = (save(tmp_path, "backbone", CONVERTED) / "README.md").read_text()
    assert "`dinov2_vitb14_reg4_pretrain.pth`" in text and "5" * 64 in text
    assert "max |difference| = 3.25e-06" in text and "timm" in text and "224x224" in text
    assert "Converter: vitreg 0.1.0" in text
    assert "Vision Transformers Need Registers" in text and "2309.16588" in text
    assert "DINOv2" in text and "2304.07193" in text
    for field in ("pooler_output", "patch_tokens", "register_tokens"):
        assert f"`{field}`" in text
    assert "trust_remote_code=True" in text and f'repo_id = "{UNPUBLISHED_REPO_ID}"' in text
    assert "Apache License 2.0" in text


def test_classifier_card_with_official_head(tmp_path):
    folder = save(tmp_path, "classifier", WITH_HEAD, classifier=True)
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]
    assert card.data.eval_results[0].metric_value == 84.4
    assert card.data.model_name == "dinov2-vitb14-reg4-linear4"
    assert "`dinov2_vitb14_reg4_linear4_head.pth`" in card.text and "7" * 64 in card.text
    assert "CLS tokens of the last 4 blocks" in card.text
    assert "AutoModelForImageClassification.from_pretrained(repo_id, trust_remote_code=True)" in card.text
    assert "| Classes | 6 |" in card.text


def test_trained_card_has_recipe_and_no_published_results(tmp_path):
    folder = save(tmp_path, "trained", TRAINED)
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "mit"
    assert "dinov2" not in card.data.tags  # a supervised recipe from scratch: neither DINOv2 weights nor recipe
    assert card.data.eval_results is None and card.data.base_model is None
    assert "`tiny.yaml`, 120 steps on 2 process(es)" in card.text
    assert "Final training loss: 2.7183." in card.text
    assert "2304.07193" not in card.text  # no DINOv2 citation for non-DINOv2 weights
    parameters = sum(p.numel() for p in ViTRegModel(tiny_config()).parameters())
    assert f"| Parameters | {parameters / 1e6:.2f}M |" in card.text


def test_repo_id_goes_into_title_and_snippets(tmp_path):
    folder = save(tmp_path, "random", RANDOM)
    card = build_card(folder, read_provenance(folder), repo_id="my-org/tiny-reg4")
    assert card.text.lstrip().startswith("# tiny-reg4")
    assert card.text.count('repo_id = "my-org/tiny-reg4"') == 2 and UNPUBLISHED_REPO_ID not in card.text
    assert "random weights" in card.text


@pytest.mark.parametrize(
    "fields, order, interpolation",
    [
        ({}, "[CLS, registers, patches]", "bicubic, antialiased |"),
        (dict(num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1), "[CLS, patches]",
         "bicubic, DINOv2's +0.1 scale offset |"),
        (dict(use_cls_token=False, pooling="mean", use_fc_norm=True, interpolate_antialias=False),
         "[registers, patches]", "bicubic |"),
    ],
)  # fmt: skip
def test_card_describes_the_token_layout_of_the_config(tmp_path, fields, order, interpolation):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(**fields).to_dict()))
    text = build_card(tmp_path, Provenance(kind="converted", source_format="timm")).text
    assert f"every token, in the order `{order}`" in text
    assert f"interpolated {interpolation}" in text
    prefix = order.count("CLS") + 4 * order.count("registers")
    assert f"`[B, {prefix} + h*w, 32]`" in text
    assert ("the mean of the patch tokens" in text) == ("CLS" not in order)


def test_provenance_is_one_typed_record(tmp_path):
    folder = save(tmp_path, "random", RANDOM)
    with pytest.raises(ValueError, match="kind"):
        Provenance(kind="downloaded")
    with pytest.raises(ValueError, match="unknown provenance field"):
        Provenance.from_dict({"kind": "random", "sorce_file": "x.pth"})
    with pytest.raises(KeyError, match="dinov2_vitx14"):
        build_card(folder, Provenance(kind="converted", official_name="dinov2_vitx14"))
    # vitreg 0.1 wrote `dataset` (which the card never read) and `converter_version`: both still load.
    legacy = Provenance.from_dict({"kind": "trained", "dataset": "imagenet-1k", "converter_version": "0.1.0"})
    assert legacy.datasets == ["imagenet-1k"] and legacy.vitreg_version == "0.1.0"
    (folder / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(UserError, match="not a valid provenance record"):
        read_provenance(folder)


def test_a_trained_models_card_carries_its_dataset(tmp_path):
    card = ModelCard.load(save(tmp_path, "trained", TRAINED) / "README.md")
    assert card.data.datasets == ["six-scikit-image-photos"]
    assert "dataset `six-scikit-image-photos`" in card.text


@pytest.mark.parametrize("name", sorted(registry.OFFICIAL_BACKBONES))
def test_every_official_backbone_gets_its_registry_facts(tmp_path, name):
    backbone = registry.OFFICIAL_BACKBONES[name]
    letter, registers = name[len("dinov2_vit")], name.endswith("_reg4")
    assert backbone.imagenet_linear_top1 == PUBLISHED_TOP1[letter][registers]
    assert backbone.num_register_tokens == (4 if registers else 0)
    assert backbone.hidden_size == 64 * backbone.num_attention_heads  # head dim 64 everywhere
    assert registry.identify_source_file(f"{name}_pretrain.pth") == (backbone, None)
    assert registry.identify_source_file(f"{name}_linear_head.pth") == (backbone, "linear")
    assert registry.identify_source_file(f"{name}_linear4_head.pth") == (backbone, "linear4")

    folder = tmp_path / "folder"
    folder.mkdir()
    config = tiny_config(num_register_tokens=backbone.num_register_tokens)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    card = build_card(folder, dataclasses.replace(CONVERTED, official_name=name, source_file=backbone.pretrain_file))
    assert card.data.base_model == backbone.base_model
    assert card.data.eval_results[0].metric_value == backbone.imagenet_linear_top1
    assert card.text.lstrip().startswith(f"# {backbone.repo_name}")
    assert ("no register tokens" in card.text) != registers


def test_registry_rows_build_the_official_models():
    import torch

    from vitreg.conversion.architectures import HEAD_KINDS, official_config
    from vitreg.modeling_vitreg import ViTRegModel

    assert HEAD_KINDS == {kind: head.num_layers for kind, head in registry.HEADS.items()}
    for row in registry.OFFICIAL_BACKBONES.values():
        with torch.device("meta"):
            model = ViTRegModel(official_config(row))
        # The published parameter counts (mask token included, as in the official files) pin down every shape.
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == row.params_millions, row.name
        assert model.config.mlp_hidden_size == (4096 if row.ffn == "swiglu" else 4 * row.hidden_size)


def test_registry_imports_without_torch():
    code = "import sys, vitreg.model_cards.registry; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def serve_from_offline_cache(folder: Path, hf_home: Path, repo_id: str) -> None:
    """Lay `folder` out as the Hub cache holds a downloaded repo: models--ORG--NAME/{refs/main,snapshots/REV}."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)


# Runs the snippets in a fresh interpreter where the project's packages cannot be imported (load_check, in the
# folder given as the first argument, hides them; "" keeps them), then prints every tensor / list they left behind
# so the test can compare real numbers.
RUNNER = """
import json, sys
if sys.argv[1]:
    sys.path.insert(0, sys.argv[1])
    from load_check import HidePackages
    sys.path.pop(0)
    sys.meta_path.insert(0, HidePackages())
import torch
results = []
for code in json.loads(sys.stdin.read()):
    namespace = {"__name__": "__main__"}
    exec(compile(code, "<card snippet>", "exec"), namespace)
    kept = {}
    for name, value in namespace.items():
        if isinstance(value, torch.Tensor):
            kept[name] = value.tolist()
        elif isinstance(value, list) and name != "__builtins__":
            kept[name] = value
    results.append(kept)
print("RESULTS " + json.dumps(results))
"""


def test_card_snippets_run_against_the_offline_hub_cache(tmp_path, photos):
    folders = {
        "vitreg-test/tiny-reg4": save(tmp_path, "backbone", CONVERTED),
        "vitreg-test/tiny-reg4-head": save(tmp_path, "classifier", WITH_HEAD, classifier=True),
    }
    image_path = tmp_path / "chelsea.png"
    photos[1].save(image_path)
    blocks = []
    for repo_id, folder in folders.items():
        model_cards.write_card(folder, read_provenance(folder), repo_id=repo_id)  # what `vitreg publish` does
        serve_from_offline_cache(folder, tmp_path / "hf_home", repo_id)
        text = (folder / "README.md").read_text()
        for code in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
            assert code.count(EXAMPLE_IMAGE_URL) == 1 and f'repo_id = "{repo_id}"' in code
            blocks.append(code.replace(EXAMPLE_IMAGE_URL, str(image_path)))
    assert len(blocks) == 4  # a pipeline and a register-aware snippet per card

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, str(Path(model_cards.__file__).parent)],
        input=json.dumps(blocks),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.split("RESULTS ", 1)[1])

    # The same computation with the vitreg package, from the folders themselves.
    processor = AutoImageProcessor.from_pretrained(folders["vitreg-test/tiny-reg4"])
    pixels = processor(images=photos[1].convert("RGB"), return_tensors="pt")["pixel_values"]  # [1, 3, 224, 224]
    backbone = ViTRegModel.from_pretrained(folders["vitreg-test/tiny-reg4"]).eval()
    classifier = ViTRegForImageClassification.from_pretrained(folders["vitreg-test/tiny-reg4-head"]).eval()
    with torch.no_grad():
        expected = backbone(pixels)
        logits = classifier(pixels).logits
        head_tokens = classifier.vitreg(pixels)

    pipeline_run, features_run, classifier_pipeline_run, classifier_features_run = results
    close = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(pipeline_run["embedding"]), expected.pooler_output[0], **close)
    torch.testing.assert_close(torch.tensor(pipeline_run["tokens"]), expected.last_hidden_state[0], **close)
    assert len(pipeline_run["tokens"]) == 1 + 4 + 16 * 16
    torch.testing.assert_close(torch.tensor(features_run["image_embedding"]), expected.pooler_output, **close)
    torch.testing.assert_close(torch.tensor(features_run["registers"]), expected.register_tokens, **close)
    patch_map = torch.tensor(features_run["patch_map"])  # [1, 16, 16, D]
    torch.testing.assert_close(patch_map, expected.patch_tokens.reshape(1, 16, 16, -1), **close)
    torch.testing.assert_close(torch.tensor(classifier_features_run["logits"]), logits, **close)
    torch.testing.assert_close(torch.tensor(classifier_features_run["registers"]), head_tokens.register_tokens, **close)
    assert classifier_pipeline_run == {}  # it only prints; its predictions are checked through the logits
    best = f"class {logits.argmax(-1).item()}"
    assert best in done.stdout
    assert PROVENANCE_FILE in {path.name for path in folders["vitreg-test/tiny-reg4"].iterdir()}


def run_snippets(blocks: list[str], env: dict, cwd: Path, hide_vitreg: bool) -> tuple[list[dict], str]:
    """Execute `blocks` in a fresh `python -I` (no working folder on the path) in `cwd`: what each left behind, and
    the printed output."""
    hidden = str(Path(model_cards.__file__).parent) if hide_vitreg else ""
    done = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, hidden],
        input=json.dumps(blocks),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULTS ", 1)[1]), done.stdout


def test_unpublished_card_snippets_run_from_the_folder_with_and_without_vitreg(tmp_path, photos):
    """An unpublished card says: set `repo_id` to this folder's path; and, with vitreg installed, that its one
    import statement makes `trust_remote_code` unnecessary. Both run as written, each in a fresh interpreter."""
    folders = [save(tmp_path, "backbone", CONVERTED), save(tmp_path, "classifier", WITH_HEAD, classifier=True)]
    image_path = tmp_path / "chelsea.png"
    photos[1].save(image_path)
    as_written, with_vitreg = [], []
    for folder in folders:
        text = (folder / "README.md").read_text()
        (statement,) = set(re.findall(r"`(import [\w.]+)`", text))  # the card's word on using the vitreg package
        for code in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL):
            assert f'repo_id = "{UNPUBLISHED_REPO_ID}"' in code and code.count("trust_remote_code=True") == 1
            code = code.replace(UNPUBLISHED_REPO_ID, str(folder)).replace(EXAMPLE_IMAGE_URL, str(image_path))
            as_written.append(code)
            with_vitreg.append(f"{statement}\n" + code.replace(", trust_remote_code=True", ""))
    assert len(as_written) == 4

    workdir = tmp_path / "empty"  # a user's working folder: no project folders to import from
    workdir.mkdir()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    without, _ = run_snippets(as_written, env, workdir, hide_vitreg=True)
    installed, printed = run_snippets(with_vitreg, env, workdir, hide_vitreg=False)

    # The same computation with the vitreg package, from the folders themselves.
    processor = AutoImageProcessor.from_pretrained(folders[0])
    pixels = processor(images=photos[1].convert("RGB"), return_tensors="pt")["pixel_values"]
    backbone = ViTRegModel.from_pretrained(folders[0]).eval()
    classifier = ViTRegForImageClassification.from_pretrained(folders[1]).eval()
    with torch.no_grad():
        expected = backbone(pixels)
        logits = classifier(pixels).logits
    close = dict(atol=1e-4, rtol=1e-4)
    for pipeline_run, features_run, _, classifier_features_run in (without, installed):
        torch.testing.assert_close(torch.tensor(pipeline_run["embedding"]), expected.pooler_output[0], **close)
        torch.testing.assert_close(torch.tensor(features_run["image_embedding"]), expected.pooler_output, **close)
        torch.testing.assert_close(torch.tensor(classifier_features_run["logits"]), logits, **close)
    assert f"class {logits.argmax(-1).item()}" in printed


def test_card_describes_the_folders_own_preprocessing(tmp_path):
    """The "Preprocessing" row reads the folder's processor: DINOv2's crop, DINOv3's whole-image resize, SAT-493M
    statistics, or a source's own processor kept as it is."""
    from vitreg.core.images import image_processor

    rope = tiny_config(position_embedding_type="rope", patch_size=16, image_size=64, num_attention_heads=2)
    satellite = Provenance(kind="converted", source_format="dinov3-hub", source_file="dinov3_vitl16_sat493m.pth")
    own = image_processor(crop_size=112, resize_size=128)
    own.image_mean, own.image_std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    cases = [
        (tiny_config(), RANDOM, None, "resize shortest edge to 256 px (bicubic), center crop 224x224, ImageNet"),
        (rope, RANDOM, None, "resize the whole image to 224x224 px (bilinear), no crop, ImageNet mean / std"),
        (rope, satellite, None, "resize the whole image to 224x224 px (bilinear), no crop, SAT-493M (satellite)"),
        (tiny_config(), RANDOM, own, "shortest edge to 128 px (bicubic), center crop 112x112, mean [0.5, 0.5, 0.5]"),
    ]
    for index, (config, provenance, processor, expected) in enumerate(cases):
        folder = save_model_folder(ViTRegModel(config), tmp_path / str(index), provenance, processor=processor)
        (row,) = [line for line in (folder / "README.md").read_text().splitlines() if "| Preprocessing |" in line]
        assert expected in row, (index, row)
