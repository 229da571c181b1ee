"""The installed package: one import name that a user's folders cannot shadow, layers that point one way, extras,
and the command's contracts (flag spellings, a missing extra named in one line, --verify without timm)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from vitreg.cli import SUBCOMMANDS, main
from vitreg.core.flags import spellings

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("conversion", "training", "analysis", "model_cards", "extract")
# Which of the package's layers each folder may import (besides itself): everything points down to the model.
ALLOWED = {
    "modeling_vitreg": set(),
    "vitreg/core": {"core", "modeling_vitreg"},
    "model_cards": {"core", "modeling_vitreg", "model_cards"},
    "conversion": {"core", "modeling_vitreg", "model_cards", "conversion"},
    "training": {"core", "modeling_vitreg", "model_cards", "training"},
    "analysis": {"core", "modeling_vitreg", "conversion", "analysis"},  # any source, converted in memory
    "extract": {"core", "modeling_vitreg", "conversion", "export", "extract"},
    "export": {"core", "modeling_vitreg", "conversion", "export"},  # any source, converted in memory
    "registers": {"core", "modeling_vitreg", "model_cards", "analysis", "registers"},
}


def test_a_users_folders_named_like_the_tools_cannot_shadow_them(tmp_path):
    for name in (*TOOLS, "modeling_vitreg", "core"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    (tmp_path / "modeling_vitreg.py").write_text("raise ImportError('a downloaded remote-code file was imported')\n")
    code = (
        "import vitreg.training.pretrain, vitreg.conversion, vitreg.analysis, vitreg.model_cards, vitreg.extract, "
        "vitreg.cli"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    done = subprocess.run(
        [sys.executable, "-m", "vitreg.training.pretrain", "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0 and "--output_dir" in done.stdout.replace("--output-dir", "--output_dir")


def test_one_import_name_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert {name.split(".")[0] for name in packages} == {"vitreg"}
    for name, folder in project["tool"]["setuptools"]["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), name


def vitreg_imports(path: Path) -> set[str]:
    """The `vitreg.<layer>` names a module imports (absolute imports only; relative ones stay in their folder)."""
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vitreg" and len(parts) > 1 and parts[1] not in ("__version__",):
                layers.add(parts[1])
    return layers


def function_level_imports(path: Path) -> set[str]:
    """The `vitreg.<layer>` names imported inside function bodies of a module (deferred, not at import time)."""
    inner = set()
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vitreg."):
                    inner.add(node.module.split(".")[1])
    return inner


def test_opening_a_model_needs_conversion_only_for_what_it_converts(tmp_path):
    """The one exception to the layers: `open_model` hands a source that is not a ViTReg folder to conversion, whose
    module it imports inside the function, so opening a folder never imports conversion."""
    opening = ROOT / "vitreg" / "core" / "opening.py"
    assert vitreg_imports(opening) - ALLOWED["vitreg/core"] == {"conversion"} == function_level_imports(opening)
    code = (
        "import sys, torch; from vitreg.core.opening import open_model; from vitreg.modeling_vitreg import *; "
        "from vitreg.core import Provenance; from vitreg.model_cards import save_model_folder; "
        "config = ViTRegConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28); "
        "save_model_folder(ViTRegModel(config), sys.argv[1], Provenance(kind='random')); "
        "print(any(m.startswith('vitreg.conversion') for m in sys.modules)); "
        "open_model(sys.argv[1]); print(any(m.startswith('vitreg.conversion') for m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-2:-1] == ["False"], done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1:] == ["False"], done.stderr[-2000:]


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_layers_point_one_way(folder):
    for path in sorted((ROOT / folder).rglob("*.py")):
        exempt = {"conversion"} if path.name == "opening.py" and folder == "vitreg/core" else set()
        used = vitreg_imports(path) - ALLOWED[folder] - exempt
        # Names that are modules of an allowed layer (e.g. `vitreg.model_cards.registry` -> model_cards) are fine;
        # anything else is a layer this folder must not reach.
        assert not used, f"{path.relative_to(ROOT)} imports vitreg.{sorted(used)}"
    # Nothing imports the command.
    for path in sorted((ROOT / folder).rglob("*.py")):
        assert "cli" not in vitreg_imports(path) and "demo" not in vitreg_imports(path), path


def test_the_model_alone_needs_four_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {spec.split(">")[0].split("=")[0].split("<")[0] for spec in project["dependencies"]}
    assert names == {"torch", "transformers", "safetensors", "huggingface-hub"}
    assert all("<" not in spec for spec in project["dependencies"])  # floors, no caps
    assert {"convert", "train", "analysis", "publish", "all", "test"} <= set(project["optional-dependencies"])


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_flag_of_every_subcommand_takes_dashes_or_underscores(name):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(SUBCOMMANDS[name].module).add_arguments(parser)
    parsers = [parser]
    for action in parser._actions:  # sub-subcommands (vitreg registers find | apply) have flags of their own
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    for each in parsers:
        flags = {option for action in each._actions for option in action.option_strings if option.startswith("--")}
        check_spellings(flags, each is parser and len(parsers) > 1)


def check_spellings(flags: set[str], only_subcommands: bool) -> None:
    """Every long flag in both spellings (a parser holding only sub-subcommands has just --help)."""
    assert len(flags) > (0 if only_subcommands else 2)
    legacy = {"--out", "--lost-split"}  # older names kept as aliases, in one spelling
    for flag in flags - legacy:
        assert set(spellings(flag)) <= flags, flag


def test_a_missing_extra_is_named(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def without_datasets(name, *args):
        if name == "vitreg.training.pretrain":
            raise ModuleNotFoundError("No module named 'datasets'", name="datasets")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_datasets)
    assert main(["pretrain", "--help"]) == 1
    assert capsys.readouterr().err.strip() == (
        "vitreg pretrain: error: needs the package 'datasets', which the [train] extra installs: "
        "pip install 'vitreg[train]'"
    )


def test_verify_without_timm_fails_before_writing(monkeypatch, tmp_path, capsys):
    from vitreg.conversion import converter, write_random_checkpoint

    source = write_random_checkpoint(tmp_path / "dinov2_vits14_reg4_pretrain.pth", hidden_size=64, num_hidden_layers=1)
    monkeypatch.setattr(converter, "timm_available", lambda: False)
    assert main(["convert", str(source), str(tmp_path / "out"), "--verify"]) == 1
    assert "pip install 'vitreg[convert]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 0  # without --verify it converts
