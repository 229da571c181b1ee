"""Sources by name, offline: Hub repos of every supported layout served from a Hub cache on disk, official DINOv2
names from torch's hub cache; converted in memory for analyze / extract, or into a folder by convert."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import make_timm, make_vitreg, randomize_, tiny_config
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from vitreg.cli import main
from vitreg.conversion import hub, random_head_state_dict, write_random_checkpoint
from vitreg.conversion.sources import official_name, resolve_source
from vitreg.core import Provenance, UserError, sample_photos
from vitreg.core.opening import open_model
from vitreg.model_cards import save_model_folder
from vitreg.model_cards.registry import OFFICIAL_BACKBONES
from vitreg.modeling_vitreg import ViTRegForImageClassification, ViTRegModel

REVISION = "0123456789abcdef0123456789abcdef01234567"
TINY = dict(hidden_size=64, num_hidden_layers=4)  # 4 blocks: what the linear4 head reads


def plant_repo(cache: Path, repo_id: str, folder: Path, revision: str = REVISION, branch: str = "main") -> Path:
    """Put `folder` into a Hub cache as `repo_id` at `revision`, with `branch` pointing at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(revision)
    return repo / "snapshots" / revision


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hub"


def transformers_repo(tmp_path: Path, registers: bool) -> tuple[Path, torch.nn.Module]:
    config_class, model_class = (
        (Dinov2WithRegistersConfig, Dinov2WithRegistersModel) if registers else (Dinov2Config, Dinov2Model)
    )
    extra = {"num_register_tokens": 4} if registers else {}
    config = config_class(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14, **extra
    )
    reference = randomize_(model_class(config))
    folder = tmp_path / ("with-registers" if registers else "plain")
    reference.save_pretrained(folder)
    return folder, reference


def tokens(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state


@pytest.mark.parametrize("registers", [False, True])
def test_transformers_repo_converts_in_memory_and_into_a_folder(cache, tmp_path, registers):
    folder, reference = transformers_repo(tmp_path, registers)
    repo_id = f"facebook/dinov2-{'with-registers-' if registers else ''}tiny"
    plant_repo(cache, repo_id, folder)
    assert snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]).endswith(REVISION)
    source = resolve_source(repo_id)
    assert source.kind == "hub" and source.path.name == REVISION
    model, processor, _ = open_model(repo_id)
    assert isinstance(model, ViTRegModel) and model.config.num_register_tokens == (4 if registers else 0)
    pixels = torch.randn(2, 3, 28, 28)
    assert (tokens(model, pixels) - tokens(reference, pixels)).abs().max() <= 1e-5
    assert processor.crop_size == {"height": 224, "width": 224}  # DINOv2's, for a repo without its own
    out = tmp_path / "converted"
    assert main(["convert", repo_id, str(out), "--revision", REVISION, "--no-progress"]) == 0
    provenance = Provenance.load(out)
    assert provenance.source_file == f"{repo_id}@{REVISION}" and provenance.base_model == repo_id
    assert (tokens(ViTRegModel.from_pretrained(out), pixels) - tokens(reference, pixels)).abs().max() <= 1e-5


def test_timm_repo(cache, tmp_path):
    vitreg = make_vitreg(tiny_config(hidden_size=64, num_attention_heads=1, layerscale_value=1.0))  # heads = D / 64
    reference = make_timm(vitreg)
    folder = tmp_path / "timm"
    folder.mkdir()
    from safetensors.torch import save_file

    save_file(reference.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0}))
    plant_repo(cache, "timm/vit_tiny_patch14_reg4_dinov2.test", folder)
    model, _, _ = open_model("timm/vit_tiny_patch14_reg4_dinov2.test")
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = reference.forward_features(pixels)
    assert isinstance(reference, timm.models.VisionTransformer)
    assert (tokens(model, pixels) - expected).abs().max() <= 1e-5


def test_vitreg_repo_loads_as_it_is(cache, tmp_path):
    expected = make_vitreg(tiny_config())
    save_model_folder(expected, tmp_path / "mine", Provenance(kind="random"))
    plant_repo(cache, "me/my-vitreg", tmp_path / "mine")
    model, _, _ = open_model("me/my-vitreg")
    pixels = torch.randn(1, 3, 28, 28)
    assert torch.equal(tokens(model, pixels), tokens(expected, pixels))


def test_a_revision_is_a_branch_or_commit(cache, tmp_path):
    folder, _ = transformers_repo(tmp_path, registers=True)
    plant_repo(cache, "org/model", folder, branch="v1")
    assert resolve_source("org/model", revision="v1").path.name == REVISION
    assert resolve_source("org/model", revision=REVISION).path.name == REVISION
    with pytest.raises(UserError, match=r"org/model \(revision main\) is not in the Hub cache"):
        resolve_source("org/model", revision="main")


def test_official_names_from_the_torch_hub_cache(cache, tmp_path):
    arch = OFFICIAL_BACKBONES["dinov2_vits14_reg4"]
    assert arch.pretrain_url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    assert official_name("dinov2_vits14_reg") == (arch, False)  # DINOv2's hubconf spelling
    assert official_name("dinov2_vits14_reg4_lc") == (arch, True)
    assert official_name("dinov2_vits14") == (OFFICIAL_BACKBONES["dinov2_vits14"], False)
    with pytest.raises(UserError) as missing:
        resolve_source("dinov2_vits14_reg4")
    message = str(missing.value)
    assert "dinov2_vits14_reg4_pretrain.pth is not in the torch hub cache" in message and arch.pretrain_url in message
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    write_random_checkpoint(checkpoints / arch.pretrain_file, "dinov2_vits14_reg4", **TINY)
    assert resolve_source("dinov2_vits14_reg").path == checkpoints / arch.pretrain_file
    model, _, _ = open_model("dinov2_vits14_reg4_lc")  # the backbone alone: the head is not even fetched
    assert isinstance(model, ViTRegModel) and model.config.num_register_tokens == 4
    with pytest.raises(UserError, match="dinov2_vits14_reg4_linear4_head.pth is not in the torch hub cache"):
        resolve_source("dinov2_vits14_reg4_lc")
    head = {key: value for key, value in random_head_state_dict(64, num_layers=4).items()}
    torch.save(head, checkpoints / arch.head_file("linear4"))
    assert main(["convert", "dinov2_vits14_reg4_lc", str(tmp_path / "lc"), "--no-progress"]) == 0
    classifier = ViTRegForImageClassification.from_pretrained(tmp_path / "lc")
    assert classifier.config.classifier_num_layers == 4 and classifier.config.num_labels == 1000
    provenance = Provenance.load(tmp_path / "lc")
    assert (provenance.source_file, provenance.head_file) == (arch.pretrain_file, arch.head_file("linear4"))


def test_a_checksum_in_the_file_name_is_checked(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a file:// URL: torch's downloader, no network
    served = tmp_path / "served"
    served.mkdir()
    payload = b"weights"
    digest = hashlib.sha256(payload).hexdigest()
    (served / f"good-{digest[:8]}.pth").write_bytes(payload)
    (served / "bad-00000000.pth").write_bytes(payload)
    fetched = hub.fetch_url((served / f"good-{digest[:8]}.pth").as_uri(), progress=False)
    assert fetched.read_bytes() == payload and fetched.parent == tmp_path / "torch" / "hub" / "checkpoints"
    with pytest.raises(UserError, match="bad-00000000.pth"):
        hub.fetch_url((served / "bad-00000000.pth").as_uri(), progress=False)
    assert not (tmp_path / "torch" / "hub" / "checkpoints" / "bad-00000000.pth").exists()


def test_bad_sources_are_one_line_errors(cache, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    plant_repo(cache, "org/no-weights", tmp_path / "config-only")
    cases = {
        "org/absent is not in the Hub cache": "org/absent",
        "org/no-weights: no supported weights": "org/no-weights",
        "not-a-thing does not exist": "not-a-thing",
        "is not a model folder": str(tmp_path / "empty"),
    }
    for message, source in cases.items():
        with pytest.raises(UserError, match=message):
            open_model(source)
    with pytest.raises(UserError, match="--revision applies to Hub repositories"):
        resolve_source(str(tmp_path / "empty"), revision="main")

    def answer(error):
        def snapshot(*args, **kwargs):
            raise error

        return snapshot

    response = SimpleNamespace(headers={}, request=None, status_code=404)  # what the Hub's errors read
    errors = {
        "is gated": GatedRepoError("gated", response=response),
        "no such model repository on the Hub": RepositoryNotFoundError("absent", response=response),
        "no revision 'v9'": RevisionNotFoundError("no revision", response=response),
    }
    for message, error in errors.items():
        monkeypatch.setattr(hub, "snapshot_download", answer(error))
        assert main(["convert", "org/anything", str(tmp_path / "out"), "--revision", "v9"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_analyze_a_plain_repo_against_a_register_repo(cache, tmp_path, capsys):
    for registers in (False, True):
        folder, _ = transformers_repo(tmp_path, registers)
        plant_repo(cache, f"facebook/dinov2-{'with-registers-' if registers else ''}tiny", folder)
    sample_photos(tmp_path / "photos", ("chelsea", "coffee"), max_side=128)
    out = tmp_path / "report"
    argv = ["analyze", "facebook/dinov2-tiny", str(tmp_path / "photos"), "--out", str(out), "--image-size", "56"]
    assert main([*argv, "--compare", "facebook/dinov2-with-registers-tiny"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "facebook/dinov2-tiny" and report["num_register_tokens"] == 0
    assert report["compare"]["num_register_tokens"] == 4 and len(report["compare"]["images"]) == 2


def test_a_missing_org_name_path_is_named_as_both(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^no local file or folder org/absent, and as a Hub repository: org/absent "):
        resolve_source("org/absent")
