"""`vitreg publish` flags that mean one thing across commands: `--branch` (the target; `--revision` names a source
model's revision everywhere else), `--batch` as a switch (as in `vitreg convert`), a dry run that says what it is
doing as it goes, and vitreg's `.vitreg` output marker, which a folder carries but a repo never gets."""

import subprocess

import pytest
import test_publish
from conftest import tiny_config
from test_publish import PROVENANCE

from vitreg.cli import main as vitreg_main
from vitreg.core.folders import MARKER
from vitreg.model_cards import publish, save_model_folder
from vitreg.modeling_vitreg import ViTRegModel

# test_publish's fixtures: a saved tiny folder, the fake Hub behind huggingface_hub's client, no token, online.
folder, fake_hub, no_token, online = (
    test_publish.folder,
    test_publish.fake_hub,
    test_publish.no_token,
    test_publish.online,
)


def test_branch_is_the_target_of_the_commit(folder, fake_hub, online, monkeypatch):
    monkeypatch.setattr(publish, "check_loads", lambda folders: [])  # the remote-code load is tested elsewhere
    args = ["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4", "--branch", "v1", "--token", "hf_x"]
    assert vitreg_main(args) == 0
    assert fake_hub.paths() == [
        "POST /api/repos/create",
        "POST /api/models/vitreg-test/tiny-reg4/branch/v1",
        "POST /api/validate-yaml",
        "POST /api/models/vitreg-test/tiny-reg4/preupload/v1",
        "POST /api/models/vitreg-test/tiny-reg4/commit/v1",
    ]
    _, files = fake_hub.commit()
    assert MARKER not in files and "README.md" in files


@pytest.mark.parametrize("spelling", ["--revision", "--revision=v1"])
def test_revision_is_refused_pointing_at_branch(folder, fake_hub, online, capsys, spelling):
    arguments = [spelling] if "=" in spelling else [spelling, "v1"]
    args = ["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4", *arguments, "--token", "hf_x"]
    assert vitreg_main(args) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--branch v1" in line and "source model's revision" in line
    assert fake_hub.requests == []  # refused before anything else


def test_batch_is_a_switch_over_model_dir(tmp_path, no_token, fake_hub, capsys):
    root = tmp_path / "converted"
    for name in ("a-reg4", "b-reg4"):
        save_model_folder(ViTRegModel(tiny_config()), root / name, PROVENANCE)
    assert vitreg_main(["publish", str(root), "--batch", "--org", "vitreg-test", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("a-reg4", "b-reg4"):
        files = len([path for path in (root / name).iterdir() if path.name != MARKER])
        assert f"{root / name} -> vitreg-test/{name}: would upload {files} files" in out
    assert MARKER not in out  # the marker of each folder stays home
    assert fake_hub.requests == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["somewhere", "--batch"], "--batch needs --org ORG"),
        (["somewhere", "--batch", "--org", "o", "--repo-id", "o/n"], "give --org ORG, not --repo-id"),
        (["--batch", "--org", "o"], "give MODEL_DIR"),
    ],
)
def test_batch_misuse_is_one_line(args, message, capsys):
    assert vitreg_main(["publish", *args, "--dry-run"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_dry_run_says_what_it_is_doing_as_it_goes(folder, no_token, fake_hub, monkeypatch, capsys):
    """The remote-code load takes seconds: its line is on stderr before it starts, after the validation's."""
    said_before_loading = []
    run = subprocess.run

    def spy(*args, **kwargs):  # the load check's fresh interpreter
        said_before_loading.append(capsys.readouterr().err)
        return run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    assert vitreg_main(["publish", str(folder), "--repo-id", "vitreg-test/tiny-reg4", "--dry-run"]) == 0
    (before,) = said_before_loading
    lines = before.strip().splitlines()
    assert lines[0] == f"validating {folder}: files, weights and card metadata"
    assert lines[1].startswith(f"loading {folder} as remote code in a fresh interpreter")
    after = capsys.readouterr()
    assert f"rendering the model card of {folder} for vitreg-test/tiny-reg4" in after.err
    assert "would upload" in after.out and "validating" not in after.out  # stdout keeps the listing alone


def test_the_marker_does_not_trouble_validation(tmp_path):
    """A folder written by vitreg carries `.vitreg`; every check, the fresh-process load included, accepts it."""
    saved = save_model_folder(ViTRegModel(tiny_config()), tmp_path / "tiny-reg4", PROVENANCE)
    assert (saved / MARKER).is_file()
    (loaded,) = publish.validate_folders([saved])
    assert loaded["class"] == "ViTRegModel" and loaded["register_tokens"] == [1, 4, 32]
    assert MARKER not in {name for name, _ in publish.upload_files(saved)}
    assert publish.find_model_folders(tmp_path) == [saved]
