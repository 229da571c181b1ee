"""The training config contract: every key is a typed field with a help text, `--help` shows each flag with its help
and default, every flag takes both spellings (`--output_dir` / `--output-dir`), and a word outside a `Literal` is
refused in one line naming the allowed words."""

import typing
from pathlib import Path

import pytest
import yaml

from vitreg import cli
from vitreg.core.errors import UserError
from vitreg.modeling_vitreg import ViTRegConfig
from vitreg.training import pretrain
from vitreg.training.config import FIELDS, TYPES, base_type, choices, field_default, load_config, model_config_kwargs

LITERAL_KEYS = [name for name in FIELDS if choices(name)]


def help_text(capsys, monkeypatch, argv: list[str], entry=pretrain.main) -> str:
    """`--help` output with whitespace collapsed (argparse wraps lines at the terminal width)."""
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that argparse never breaks a word
    with pytest.raises(SystemExit) as stopped:
        entry(argv)
    assert stopped.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_every_key_is_typed_and_documented():
    assert {"objective", "centering", "lr_scaling", "supervised_loss", "blur_convention", "mixed_precision"} <= set(
        LITERAL_KEYS
    )
    for name, spec in FIELDS.items():
        assert spec.metadata.get("help"), f"{name} has no help text"
        hint = base_type(name)
        assert isinstance(hint, type) or typing.get_origin(hint) in (typing.Literal, tuple), (name, hint)
    assert choices("objective") == typing.get_args(TYPES["objective"])


@pytest.mark.parametrize("entry", ["module", "cli"])
def test_help_lists_every_flag_with_its_help_and_default(capsys, monkeypatch, entry):
    if entry == "module":
        text = help_text(capsys, monkeypatch, ["--help"])
    else:
        text = help_text(capsys, monkeypatch, ["pretrain", "--help"], cli.main)
    for name, spec in FIELDS.items():
        assert f"--{name}" in text and f"--{name.replace('_', '-')}" in text, name
        shown = pretrain.shown_default(field_default(name))
        assert f"{spec.metadata['help']} (default: {shown})" in text, name
    for flag in ("--output-dir", "--resume-from-checkpoint", "--config", "--overwrite", "--no-progress"):
        assert flag in text
    assert "(default: [0.32, 1.0])" in text and "(default: null)" in text and "(default: false)" in text
    assert "{dinov2,supervised}" in text  # a Literal key shows its words


def capture_train(monkeypatch) -> dict:
    """Replace the training with a recorder of what `run` hands it."""
    seen = {}

    def fake_train(config, output_dir, resume, overwrite, config_file, progress=True):
        seen.update(config=config, output_dir=output_dir, resume=resume, overwrite=overwrite, progress=progress)
        return 0

    monkeypatch.setattr(pretrain, "train", fake_train)
    return seen


@pytest.mark.parametrize("dashes", [False, True])
@pytest.mark.parametrize("entry", ["module", "cli"])
def test_every_flag_takes_both_spellings(monkeypatch, tmp_path, dashes, entry):
    seen = capture_train(monkeypatch)

    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')}" if dashes else f"--{name}"

    argv = [flag("config"), "smoke-dinov2", flag("output_dir"), str(tmp_path / "run")]
    argv += [flag("resume_from_checkpoint"), "latest", flag("overwrite"), flag("no_progress")]
    argv += [flag("max_steps"), "7", flag("global_crops_scale"), "[0.4, 1]", flag("model"), "{num_register_tokens: 0}"]
    argv += [flag("lr_scaling"), "none", flag("shuffle_buffer_size"), "0", flag("peak_tflops"), "null"]
    argv += [flag("blur_convention"), "paper", flag("repeated_augmentations"), "2"]
    code = pretrain.main(argv) if entry == "module" else cli.main(["pretrain", *argv])
    assert code == 0
    config = seen["config"]
    assert seen["output_dir"] == tmp_path / "run" and seen["resume"] == "latest" and seen["overwrite"]
    assert seen["progress"] is False
    assert config.max_steps == 7 and config.global_crops_scale == (0.4, 1.0) and config.lr_scaling == "none"
    assert config.model["num_register_tokens"] == 0 and config.model["hidden_size"] == 64  # merged into the YAML's
    assert config.shuffle_buffer_size == 0 and config.peak_tflops is None and config.blur_convention == "paper"
    assert config.repeated_augmentations == 2


@pytest.mark.parametrize("name", LITERAL_KEYS)
def test_a_word_outside_the_literal_is_one_line_naming_the_allowed_words(capsys, tmp_path, name):
    argv = ["pretrain", "--config", "smoke-dinov2", "--output-dir", str(tmp_path / "run"), f"--{name}", "bogus"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vitreg pretrain: error: config:"), err
    assert f"{name} must be one of" in err and "got 'bogus'" in err
    for word in choices(name):
        assert repr(word) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", LITERAL_KEYS)
def test_every_allowed_word_is_accepted(name):
    objective = "supervised" if name == "supervised_loss" else None
    for word in choices(name):
        overrides = {name: word, **({"objective": objective} if objective else {})}
        if name == "objective" and word == "supervised":
            overrides["supervised_loss"] = "ce"  # the smoke-dinov2 values stay valid for a supervised run
        assert getattr(load_config("smoke-dinov2", overrides), name) == word


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_steps": "ten"}, "expected int"),
        ({"mixed_precision": 16}, "expected one of 'no', 'fp16', 'bf16', 'fp8' or null"),
        ({"base_lr": None}, "base_lr must not be null"),
        ({"three_augment": "yes"}, "expected bool"),
        ({"crop_scale": [0.1]}, "a pair of numbers"),
        ({"repeated_augmentations": 0}, "repeated_augmentations must be positive"),
        ({"shuffle_buffer_size": -1}, "shuffle_buffer_size must be >= 0"),
        ({"repeated_augmentations": 3, "dataset": "photos"}, "repeated_augmentations needs data_dir"),
    ],
)
def test_types_are_checked_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        load_config("smoke-dinov2", overrides)
    assert "\n" not in str(error.value)


def test_yaml_values_take_the_field_types():
    config = load_config("smoke-dinov2", {"clip_grad": 1, "peak_tflops": 989, "mixed_precision": None})
    assert isinstance(config.clip_grad, float) and isinstance(config.peak_tflops, float)
    assert config.mixed_precision is None


def test_the_defaults_alone_are_a_valid_config():
    """`vitreg pretrain` without --config trains the defaults: every crop a multiple of the default model's patch
    (DINOv2's ViT/14 recipes crop 224 and 98 px; its patch-16 default config crops 96, which 14 does not divide)."""
    config = load_config(None)
    patch = ViTRegConfig(**model_config_kwargs(config)).patch_size
    assert patch == 14 and config.global_crop_size % patch == 0 and config.local_crop_size % patch == 0
    assert (config.global_crop_size, config.local_crop_size) == (224, 98)


@pytest.mark.parametrize("flag", ["--accelerate-config-path", "--accelerate_config_path"])
@pytest.mark.parametrize("entry", ["module", "cli"])
def test_the_installed_accelerate_configs_are_one_flag_away(capsys, flag, entry):
    """`accelerate launch --config_file "$(vitreg pretrain --accelerate-config-path fsdp)"` works from an installed
    package (the files are package data beside the module, not a path of the source checkout); no other flag needed."""
    for name, distributed_type in (("ddp", "MULTI_GPU"), ("fsdp", "FSDP")):
        with pytest.raises(SystemExit) as stopped:
            pretrain.main([flag, name]) if entry == "module" else cli.main(["pretrain", flag, name])
        assert stopped.value.code == 0
        path = Path(capsys.readouterr().out.strip())
        assert path.is_absolute() and path.parent == Path(pretrain.__file__).parent / "configs" / "accelerate"
        assert yaml.safe_load(path.read_text())["distributed_type"] == distributed_type
