"""`vitreg extract` as a user runs it (issue 19): resuming from another spelling of the same paths, what a refused
resume and an interrupt say, a dataset's other columns kept, and one-line errors for a missing extra and an
output location that cannot be written."""

import os
import shlex
import sys

import datasets
import numpy as np
import pytest
from conftest import make_vitreg, tiny_config

from vitreg.cli import main
from vitreg.core import Provenance, UserError, sample_photos
from vitreg.extract import extract_features, load_features
from vitreg.extract.output import ShardWriter
from vitreg.model_cards import save_model_folder

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract-runs")
    save_model_folder(make_vitreg(tiny_config()), root / "model", Provenance(kind="random"))
    sample_photos(root / "photos", PHOTOS, max_side=160)
    return root


@pytest.fixture
def killed_after_the_first_shard(monkeypatch):
    """Interrupt the next extraction as its second shard completes (as Ctrl-C would)."""
    commit = ShardWriter.commit
    commits = []

    def commit_once(writer):
        if commits:
            raise KeyboardInterrupt
        commits.append(writer.path)
        commit(writer)

    monkeypatch.setattr(ShardWriter, "commit", commit_once)
    yield
    monkeypatch.setattr(ShardWriter, "commit", commit)


def test_the_same_job_resumes_from_relative_or_absolute_paths(folders, tmp_path, monkeypatch, request):
    monkeypatch.chdir(folders)
    options = dict(shard_size=2, batch_size=1, workers=0, what="cls", progress=False)
    request.getfixturevalue("killed_after_the_first_shard")
    with pytest.raises(KeyboardInterrupt):
        extract_features("model", "photos", tmp_path / "out", **options)  # relative to the working folder
    monkeypatch.undo()
    summary = extract_features(folders / "model", folders / "photos", tmp_path / "out", **options)  # absolute
    assert summary["images_this_run"] == 3 and summary["rows"] == 5


def test_a_refused_resume_names_every_setting_that_changed(folders, tmp_path, killed_after_the_first_shard):
    options = dict(shard_size=2, batch_size=1, workers=0, what="cls", progress=False)
    with pytest.raises(KeyboardInterrupt):
        extract_features(folders / "model", folders / "photos", tmp_path / "out", **options)
    with pytest.raises(UserError) as refused:
        extract_features(folders / "model", folders / "photos", tmp_path / "out",
                         **{**options, "what": "cls,patch", "image_size": 56})  # fmt: skip
    message = str(refused.value)
    assert "--image-size was 224x224, now 56x56" in message and "--what was cls, now cls,patch" in message
    assert "--overwrite" in message and "\n" not in message


def test_an_interrupt_prints_the_command_that_resumes(folders, tmp_path, capsys, monkeypatch, request):
    out = tmp_path / "out"
    argv = ["extract", str(folders / "model"), str(folders / "photos"), "--out", str(out), "--shard-size", "2",
            "--batch-size", "1", "--workers", "0", "--what", "cls,registers", "--overwrite"]  # fmt: skip
    request.getfixturevalue("killed_after_the_first_shard")
    assert main(argv) == 130
    hint = capsys.readouterr().err
    command = shlex.split(hint.split("to resume, run: ")[1].splitlines()[0])
    assert command[:2] == ["vitreg", "extract"] and "--overwrite" not in command  # --overwrite would start again
    monkeypatch.undo()
    assert main(command[1:]) == 0
    assert "3 this run" in capsys.readouterr().out
    assert load_features(out).num_rows == 5


def test_a_saved_dataset_keeps_its_other_columns(folders, tmp_path):
    for label, names in {"cats": PHOTOS[:2], "things": PHOTOS[2:]}.items():
        sample_photos(tmp_path / "photos" / label, names, max_side=160)
    source = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "photos"), split="train")
    source = source.add_column("caption", [f"photo {index}" for index in range(len(source))])
    source = source.add_column("id", [f"img-{index}" for index in range(len(source))])  # clashes with the output's
    source.save_to_disk(str(tmp_path / "saved"))
    extract_features(folders / "model", tmp_path / "saved", tmp_path / "out", what="cls", workers=0, progress=False)
    features = load_features(tmp_path / "out")
    assert features.column_names == ["id", "label", "caption", "source_id", "cls"]
    assert features.features["label"] == source.features["label"]  # the class names travel with it
    assert features["label"] == source["label"] and features["caption"] == source["caption"]
    assert features["source_id"] == source["id"] and features["id"] == [str(i) for i in range(len(source))]
    assert np.asarray(features.with_format("numpy")["cls"]).shape == (5, 32)


def test_a_missing_datasets_package_names_the_extra(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: importing it fails
    argv = ["extract", str(folders / "model"), str(folders / "photos"), "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        "vitreg extract: error: needs the package 'datasets', which the [extract] extra installs: "
        "pip install 'vitreg[extract]'"
    )
    assert not (tmp_path / "out").exists()


def test_outputs_that_cannot_be_written_are_one_line_errors(folders, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    cases = [(tmp_path / "a-file" / "out", "cannot create")]
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append((tmp_path / "read-only" / "out", "cannot create"))
    for out, message in cases:
        argv = ["extract", str(folders / "model"), str(folders / "photos"), "--out", str(out), "--workers", "0"]
        assert main([*argv, "--no-progress"]) == 1, out
        error = capsys.readouterr().err.strip()
        assert error.startswith("vitreg extract: error: ") and message in error and "\n" not in error, error


def test_overwrite_never_deletes_what_vitreg_did_not_write(folders, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="holds files vitreg did not write"):
        extract_features(folders / "model", folders / "photos", tmp_path / "mine", overwrite=True, workers=0)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(tmp_path / "mine")
    with pytest.raises(UserError, match="is the working folder"):
        extract_features(folders / "model", folders / "photos", ".", workers=0)
    with pytest.raises(UserError, match="holds the input"):
        extract_features(folders / "model", folders / "photos", folders, overwrite=True, workers=0)
