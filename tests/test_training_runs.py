"""End-to-end pretraining runs on real photos: loss falls, export loads in a pipeline, non-finite loss, bad
configs, corrupt images, unwritable folders and interrupts stop cleanly, two processes really train together, and a
SIGKILLed run resumes to the same weights."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from vitreg import cli
from vitreg.core.images import sample_photos
from vitreg.model_cards import save_model_folder
from vitreg.modeling_vitreg import ViTRegModel
from vitreg.training import pretrain
from vitreg.training.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "moon")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    """An imagefolder of 8 scikit-image photos (about 80 px), in two class subfolders (colour, grey)."""
    root = tmp_path_factory.mktemp("photos")
    sample_photos(root, PHOTOS, max_side=80, by_colour=True)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """Each in-process run builds its own Accelerator; one intra-op thread, as tiny ops on a shared machine run
    many times faster without OpenMP threads competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)  # accelerate's state is reset after every test (conftest.py)


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def command(photo_dir: Path, output_dir: Path, config: str, *extra: str) -> list[str]:
    return ["--config", config, "--data_dir", str(photo_dir), "--output_dir", str(output_dir), *extra]


def test_dinov2_smoke_run_learns_and_exports_the_teacher(photo_dir, tmp_path):
    out = tmp_path / "run"
    assert pretrain.main(command(photo_dir, out, "smoke-dinov2", "--num_workers", "1")) == 0

    logged = metrics(out)
    assert [r["step"] for r in logged] == list(range(5, 41, 5))
    first, last = logged[0]["loss"], np.mean([r["loss"] for r in logged[-2:]])
    assert last < 0.95 * first, [round(r["loss"], 3) for r in logged]
    assert {"dino_loss", "ibot_loss", "koleo_loss", "lr", "images_per_s"} <= set(logged[0])
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 1 and run["config"]["objective"] == "dinov2" and "torch" in run["versions"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000020", "step_00000040"]

    # The export is the EMA teacher's backbone, not the student.
    exported = load_file(out / "model" / "model.safetensors")
    objective = load_file(out / "checkpoints" / "step_00000040" / "objective.safetensors")
    student = load_file(out / "checkpoints" / "step_00000040" / "model.safetensors")
    name = "embeddings.register_tokens"
    assert torch.equal(exported[name], objective[f"teacher.backbone.{name}"])
    assert not torch.equal(
        exported["encoder.layer.0.mlp.fc1.weight"], student["backbone.encoder.layer.0.mlp.fc1.weight"]
    )

    from transformers import AutoModel, pipeline

    model = AutoModel.from_pretrained(out / "model")
    assert model.config.num_register_tokens == 4
    extractor = pipeline("image-feature-extraction", model=str(out / "model"))
    features = np.asarray(extractor(Image.open(next(photo_dir.rglob("*.jpg")))))
    assert features.shape == (1, 1 + 4 + 16, 64)  # CLS, 4 registers, 4x4 patches of the 32 px crop
    card = ModelCard.load(out / "model" / "README.md")
    assert "trained" in card.text and "dinov2" in card.data.tags
    # A local image folder is named in the text; the `datasets:` metadata holds Hub dataset ids only.
    assert f"the local folder `{photo_dir.name}`" in card.text and card.data.datasets is None


def test_a_run_on_a_hub_dataset_records_it_in_the_card_metadata(tmp_path):
    config = load_config("smoke-dinov2", {"dataset": "ILSVRC/imagenet-1k"})
    provenance = pretrain.run_provenance(config, "smoke-dinov2.yaml", 6.5, 2)
    assert provenance.datasets == ["ILSVRC/imagenet-1k"] and provenance.local_data is None
    save_model_folder(ViTRegModel(tiny_config()), tmp_path / "model", provenance)
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.datasets == ["ILSVRC/imagenet-1k"] and "`ILSVRC/imagenet-1k`" in card.text


def test_supervised_smoke_run_learns_the_classes(photo_dir, tmp_path):
    out = tmp_path / "run"
    flags = [
        "--num_workers",
        "1",
        "--max_steps",
        "30",
        "--three_augment",
        "false",
        "--color_jitter",
        "0",
        "--crop_scale",
        "[0.6, 1.0]",
        "--model",
        "{num_register_tokens: 0}",
    ]
    assert pretrain.main(command(photo_dir, out, "smoke-supervised", *flags)) == 0
    logged = metrics(out)
    assert np.mean([r["loss"] for r in logged[-2:]]) < 0.75 * logged[0]["loss"], [r["loss"] for r in logged]

    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(out / "model"))
    labels = {result["label"] for result in classifier(Image.open(next(photo_dir.rglob("*.jpg"))))}
    assert labels == {"color", "gray"}
    assert json.loads((out / "model" / "config.json").read_text())["num_register_tokens"] == 0


# A DINOv3-style student: RoPE with its train-time coordinate augmentations, 4 registers, masked key bias, untied
# CLS/patch norms, SwiGLU (the DINOv3 recipe's Gram anchoring and high-resolution stages are not implemented).
ROPE_MODEL = (
    "{position_embedding_type: rope, rope_rescale_coords: 2.0, rope_jitter_coords: 1.2, rope_shift_coords: 0.1, "
    "mask_k_bias: true, untie_cls_and_patch_norms: true, use_swiglu_ffn: true, layer_norm_eps: 1.0e-5}"
)


@pytest.mark.parametrize("config", ["smoke-dinov2", "smoke-supervised"])
def test_a_rope_vit_with_registers_trains_and_saves_a_folder_that_reloads(photo_dir, tmp_path, monkeypatch, config):
    from vitreg.modeling_vitreg.modeling_vitreg import ViTRegRopePositionEmbedding

    augment = ViTRegRopePositionEmbedding.augment
    augmented_grids = []  # the patch grids whose coordinates were augmented: training-mode forwards only

    def counting(self, coords):
        augmented_grids.append(len(coords))
        return augment(self, coords)

    monkeypatch.setattr(ViTRegRopePositionEmbedding, "augment", counting)
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--logging_steps", "1", "--checkpointing_steps", "2", "--num_workers", "0"]
    assert pretrain.main(command(photo_dir, out, config, *flags, "--model", ROPE_MODEL)) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2] and all(np.isfinite(r["loss"]) for r in metrics(out))
    # The student's forwards in training mode rotate augmented coordinates: 4x4 patches of the 32 px global crops,
    # and with DINOv2 also 2x2 of the 16 px local crops; the EMA teacher runs in eval mode, without augmentation.
    assert set(augmented_grids) == ({16, 4} if config == "smoke-dinov2" else {16})

    from transformers import AutoModel

    model = AutoModel.from_pretrained(out / "model").eval()
    assert model.config.uses_rope and model.config.mask_k_bias and model.config.num_register_tokens == 4
    assert "embeddings.position_embeddings" not in load_file(out / "model" / "model.safetensors")
    pixels = torch.randn(1, 3, 48, 64)  # any multiple of the patch: no positions to interpolate
    with torch.no_grad():
        first, second = model(pixels), model(pixels)
    assert first.patch_tokens.shape == (1, 6 * 8, 64) and first.register_tokens.shape == (1, 4, 64)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)  # eval: no coordinate augmentation
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.license == "apache-2.0" and "rope" in card.data.tags and "dinov3" not in card.data.tags


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(photo_dir, tmp_path, monkeypatch, capsys):
    from vitreg.training import objectives

    calls = {"n": 0}
    real = objectives.dino_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(objectives, "dino_loss", poisoned)
    out = tmp_path / "run"
    flags = ["--num_workers", "0", "--max_steps", "8", "--checkpointing_steps", "3", "--logging_steps", "1"]
    assert pretrain.main(command(photo_dir, out, "smoke-dinov2", *flags)) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1
    error = error[0]
    assert "not finite at step 5" in error and "step_00000003" in error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]
    assert not (out / "model").exists()
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--base_lr", "-1"], "base_lr must be positive"),
        (["--local_crop_size", "64"], "bigger than global_crop_size"),
        (["--model", "{position_embedding_type: sincos}"], "position_embedding_type must be one of"),
        (["--model", "{position_embedding_type: rope, rope_thea: 10}"], "unknown ViTRegConfig field(s): rope_thea"),
        (["--model", "{untie_global_and_local_cls_norm: true}"], "for converted DINOv3 checkpoints only"),
        (["--colour", "red"], None),
    ],
)
def test_bad_values_are_refused_before_training(photo_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    if message is None:  # an unknown flag is argparse's job
        with pytest.raises(SystemExit):
            cli.main(["pretrain", *command(photo_dir, out, "smoke-dinov2"), *flags])
        return
    assert cli.main(["pretrain", *command(photo_dir, out, "smoke-dinov2"), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("vitreg pretrain: error:")
    assert not out.exists()


def test_hub_dataset_offline_is_one_clear_line(tmp_path, capsys):
    argv = ["--config", "smoke-dinov2", "--dataset", "someone/images", "--output_dir", str(tmp_path / "run")]
    assert pretrain.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "offline" in err and "--data_dir" in err


def test_a_stream_from_a_local_folder_resumes_from_its_saved_position(photo_dir, tmp_path, capsys):
    """--dataset with a local imagefolder streams offline; a run resumed from a checkpoint restores each worker's
    stream position from the checkpoint (data_state_0.pt) and ends on the weights of the uninterrupted run. Another
    number of workers cannot take over those positions: one line says which to pass (torchdata: AssertionError)."""
    flags = ["--max_steps", "4", "--checkpointing_steps", "2", "--logging_steps", "1", "--batch_size_per_device", "4"]
    flags += ["--num_workers", "2", "--shuffle_buffer_size", "0"]  # 2 readers of 4 photos: a new epoch every step

    def stream_command(output_dir: Path, *extra: str) -> list[str]:
        argv = ["--config", "smoke-dinov2", "--dataset", str(photo_dir), "--output_dir", str(output_dir)]
        return argv + flags + list(extra)

    whole = tmp_path / "whole"
    assert pretrain.main(stream_command(whole)) == 0
    middle = whole / "checkpoints" / "step_00000002"
    assert (middle / "data_state_0.pt").is_file()

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = tmp_path / "resumed"
    assert pretrain.main(stream_command(resumed, "--resume_from_checkpoint", str(middle))) == 0
    name = "checkpoints/step_00000004/model.safetensors"
    expected, actual = load_file(whole / name), load_file(resumed / name)
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx([r["loss"] for r in metrics(whole)][2:], abs=1e-6)

    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    other = tmp_path / "other"
    assert pretrain.main(stream_command(other, "--resume_from_checkpoint", str(middle), "--num_workers", "1")) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and error[0].endswith("this run has --num_workers 1: resume with --num_workers 2")
    assert not other.exists()  # nothing was saved: nothing left to block the corrected command


def subprocess_env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }


TWO_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "-m",
    "vitreg.training.pretrain",
]


def test_two_processes_train_together(photo_dir, tmp_path):
    out = tmp_path / "run"
    launch = TWO_PROCESSES
    flags = ["--max_steps", "6", "--batch_size_per_device", "4", "--num_workers", "1", "--logging_steps", "3"]
    done = subprocess.run(
        launch + command(photo_dir, out, "smoke-dinov2", *flags),
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["num_processes"] == 2 and run["distributed_type"].endswith("MULTI_CPU")
    final = out / "checkpoints" / "step_00000006"
    assert (final / "random_states_0.pkl").exists() and (final / "random_states_1.pkl").exists()
    logged = metrics(out)
    assert [r["step"] for r in logged] == [3, 6]
    # images/s counts the global batch: 2 processes x 4 images per step
    assert logged[-1]["images_per_s"] == pytest.approx(8 / logged[-1]["step_time_s"])
    assert (out / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_stream_their_own_examples_and_resume_from_their_positions(photo_dir, tmp_path):
    """Two gloo processes stream one local folder; each saves its stream position, and a resumed run (which loads
    the objective state on `cpu:0` devices) ends on the weights of the uninterrupted one."""
    flags = ["--max-steps", "4", "--checkpointing-steps", "2", "--logging-steps", "2", "--batch-size-per-device", "2"]
    flags += ["--num-workers", "1", "--shuffle-buffer-size", "0"]
    kwargs = dict(cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)

    def stream_command(output_dir: Path, *extra: str) -> list[str]:
        argv = ["--config", "smoke-dinov2", "--dataset", str(photo_dir), "--output-dir", str(output_dir)]
        return TWO_PROCESSES + argv + flags + list(extra)

    whole = tmp_path / "whole"
    done = subprocess.run(stream_command(whole), **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    middle = whole / "checkpoints" / "step_00000002"
    assert (middle / "data_state_0.pt").is_file() and (middle / "data_state_1.pt").is_file()
    resumed = tmp_path / "resumed"
    done = subprocess.run(stream_command(resumed, "--resume-from-checkpoint", str(middle)), **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    name = "checkpoints/step_00000004/model.safetensors"
    expected, actual = load_file(whole / name), load_file(resumed / name)
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6


def test_sigkill_and_resume_ends_on_the_same_weights(photo_dir, tmp_path):
    flags = ["--max_steps", "8", "--checkpointing_steps", "3", "--logging_steps", "2", "--num_workers", "2"]
    train = [sys.executable, "-m", "vitreg.training.pretrain"]
    kwargs = dict(cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)

    whole = tmp_path / "whole"
    done = subprocess.run(train + command(photo_dir, whole, "smoke-dinov2", *flags), **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        train + command(photo_dir, killed, "smoke-dinov2", *flags),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 200
    while not (killed / "checkpoints" / "step_00000003" / "trainer_state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()  # it really died mid-run

    resumed = subprocess.run(
        train + command(photo_dir, killed, "smoke-dinov2", *flags, "--resume_from_checkpoint", "latest"), **kwargs
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in (
        "model/model.safetensors",
        "checkpoints/step_00000008/model.safetensors",
        "checkpoints/step_00000008/objective.safetensors",
    ):
        expected, actual = load_file(whole / name), load_file(killed / name)
        assert expected.keys() == actual.keys()
        assert max((expected[k] - actual[k]).abs().max().item() for k in expected) <= 1e-6, name
    assert [r["step"] for r in metrics(killed)] == [2, 4, 6, 8]
    assert [r["loss"] for r in metrics(killed)] == pytest.approx([r["loss"] for r in metrics(whole)], abs=1e-6)


def test_a_finished_run_is_not_overwritten_by_accident(photo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert pretrain.main(command(photo_dir, out, "smoke-dinov2")) == 1
    assert "--resume_from_checkpoint latest, or --overwrite" in capsys.readouterr().err
    missing = ["--resume_from_checkpoint", str(tmp_path / "nowhere")]
    assert pretrain.main(command(photo_dir, out, "smoke-dinov2", *missing)) == 1
    assert "is not a checkpoint folder" in capsys.readouterr().err


def test_a_folder_of_other_files_is_refused_even_with_overwrite(photo_dir, tmp_path, capsys):
    """--overwrite replaces a run's checkpoints/ and model/: never those of a folder that holds no run."""
    theirs = tmp_path / "theirs"
    (theirs / "model").mkdir(parents=True)
    (theirs / "thesis.tex").write_text("\\begin{document}")
    for extra in ([], ["--overwrite"], ["--resume_from_checkpoint", "latest"]):
        assert pretrain.main(command(photo_dir, theirs, "smoke-dinov2", "--max_steps", "1", *extra)) == 1
        assert "holds files of no pretraining run (model, thesis.tex): name a new folder" in capsys.readouterr().err
    assert sorted(p.name for p in theirs.iterdir()) == ["model", "thesis.tex"]


@pytest.fixture
def restore_progress_bars():
    """--no-progress silences the libraries' bars for the whole process: give them back to the next tests."""
    yield
    import datasets
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging

    datasets.enable_progress_bars()
    enable_progress_bars()
    logging.enable_progress_bar()


@pytest.fixture
def truncated_photos(photo_dir, tmp_path) -> Path:
    """The photos, one of them cut in half as an interrupted download leaves it."""
    root = tmp_path / "photos"
    shutil.copytree(photo_dir, root)
    broken = root / "color" / "astronaut.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    return root


@pytest.mark.parametrize("source, num_workers", [("--data_dir", 0), ("--data_dir", 2), ("--dataset", 2)])
def test_a_truncated_jpeg_is_one_line_naming_it_and_leaves_nothing_behind(
    truncated_photos, tmp_path, capsys, restore_progress_bars, source, num_workers
):
    """The image is decoded in a DataLoader worker (or in the main process): either way one line names the file,
    and the run, stopped before its first checkpoint, leaves no run.json to refuse the corrected command."""
    out = tmp_path / "run"
    argv = ["pretrain", "--config", "smoke-dinov2", source, str(truncated_photos), "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--num_workers", str(num_workers), "--shuffle_buffer_size", "0", "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    broken = truncated_photos / "color" / "astronaut.jpg"
    assert err.startswith(f"vitreg pretrain: error: cannot read the training image {broken} (image file is truncated")
    assert not out.exists()


def test_an_unwritable_output_location_is_one_line_before_any_work(photo_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    unwritable = [tmp_path / "a_file" / "run"]  # a file where a folder must be
    if os.geteuid() != 0:  # root writes through permission bits
        read_only = tmp_path / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
        unwritable.append(read_only / "run")
    for out in unwritable:
        assert cli.main(["pretrain", *command(photo_dir, out, "smoke-dinov2")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith(f"vitreg pretrain: error: cannot create {out}"), err


def test_pretrain_without_a_config_trains_the_defaults(photo_dir, tmp_path, restore_progress_bars):
    """No --config: the default ViT/14 with 224 px global and 98 px local crops (96, DINOv2's patch-16 default, was
    refused); only sizes that make it fast on a CPU are given."""
    out = tmp_path / "run"
    small = ["--model", "{hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4}", "--local_crops_number", "2"]
    small += ["--head_n_prototypes", "64", "--head_hidden_dim", "128", "--head_bottleneck_dim", "64"]
    small += ["--batch_size_per_device", "2", "--max_steps", "1", "--num_workers", "0", "--no-progress"]
    assert cli.main(["pretrain", "--data_dir", str(photo_dir), "--output_dir", str(out), *small]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["global_crop_size"] == 224 and run["config"]["local_crop_size"] == 98
    model = json.loads((out / "model" / "config.json").read_text())
    assert model["patch_size"] == 14 and model["image_size"] == 224


@pytest.mark.parametrize("stop_at_step", [1, 3])
def test_an_interrupt_says_how_to_resume(photo_dir, tmp_path, monkeypatch, capsys, restore_progress_bars, stop_at_step):
    real = pretrain.train_step
    steps = {"n": 0}

    def interrupted(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == stop_at_step:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main process
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_step", interrupted)
    out = tmp_path / "run"
    argv = command(photo_dir, out, "smoke-dinov2", "--max_steps", "4", "--checkpointing_steps", "2", "--num_workers")
    argv += ["0", "--no-progress"]
    assert cli.main(["pretrain", *argv]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    if stop_at_step == 1:
        assert err[0].startswith("pretrain: interrupted before the first checkpoint (checkpointing_steps 2)")
        assert err[0].endswith("the same command starts the run again") and not out.exists()
        return
    last = out / "checkpoints" / "step_00000002"
    assert err[0] == (
        f"pretrain: interrupted; the last checkpoint is {last}: the same command with --resume_from_checkpoint "
        "latest continues from it"
    )
    assert err[1] == "vitreg pretrain: interrupted"
    monkeypatch.setattr(pretrain, "train_step", real)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert cli.main(["pretrain", *argv, "--resume_from_checkpoint", "latest"]) == 0
    assert json.loads((out / "run.json").read_text())["start_step"] == 2 and (out / "model").is_dir()


def test_outputs_take_the_umask_and_no_progress_draws_no_bar(photo_dir, tmp_path, capsys, restore_progress_bars):
    """A teammate may read a run (checkpoints included: safetensors writes 0600 whatever the umask); --no-progress
    leaves the log lines and no bar (the loop's, datasets' or transformers')."""
    out = tmp_path / "run"
    flags = ["--max_steps", "2", "--checkpointing_steps", "1", "--num_workers", "0", "--no-progress"]
    previous = os.umask(0o027)
    try:
        assert cli.main(["pretrain", *command(photo_dir, out, "smoke-dinov2", *flags)]) == 0
    finally:
        os.umask(previous)
    assert capsys.readouterr().err.strip().splitlines() == [f"pretrain: done, 2 steps; model in {out / 'model'}"]
    modes = {str(path.relative_to(tmp_path)): path.stat().st_mode & 0o777 for path in [out, *out.rglob("*")]}
    assert modes == {name: 0o750 if (tmp_path / name).is_dir() else 0o640 for name in modes}
