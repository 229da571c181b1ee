"""One way to open a model: a source in, `(model, processor, provenance)` out, for every tool.

    model, processor, provenance = open_model("facebook/dinov2-with-registers-small")  # converted in memory

A source is a ViTReg folder or Hub repo (loaded as it is, through the Auto classes), or anything `vitreg convert`
reads: a DINOv2 / DINOv3 / timm / transformers checkpoint, file, folder or Hub repo, an official DINOv2 name
(converted in memory by `vitreg.conversion`, imported only then). The processor follows one policy, the one
`save_model_folder` writes: the source's own `preprocessor_config.json`, else `images.default_processor`.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UserError
from .images import default_processor, is_satellite
from .provenance import Provenance

HEADS = ("model", "classification", "backbone")  # what a tool asks for: the bare encoder, the classifier, stages


class OpenedModel(NamedTuple):
    """An opened model: eval mode, float32, on the asked device; its image processor; where it came from."""

    model: Any  # a ViTRegModel, ViTRegForImageClassification or ViTRegBackbone
    processor: Any  # a transformers image processor
    provenance: Provenance


def folder_config(path: Path) -> dict | None:
    """A folder's `config.json` as a dict (None for a file or a folder without one; invalid JSON: a UserError)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None


def is_vitreg_folder(path: Path) -> bool:
    """Whether `path` is a folder whose config.json names a ViTReg model."""
    return Path(path).is_dir() and (folder_config(Path(path)) or {}).get("model_type") == "vitreg"


def open_model(
    source: Any,
    *,
    revision: str | None = None,
    head: str = "model",
    device: str | None = "cpu",
    progress: bool = True,
) -> OpenedModel:
    """Open any model source as `head` (`model`, `classification` or `backbone`) on `device`, eval, float32.

    `source` may also be a loaded ViTReg model or a `(model, processor)` pair, passed through (moved to `device`).
    """
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    if isinstance(source, tuple):
        model, processor = source[:2]
        return OpenedModel(to_device(model, device), processor, Provenance(kind="random", name=model_name(model)))
    if hasattr(source, "config") and hasattr(source, "forward"):
        processor = default_processor(source.config)
        return OpenedModel(to_device(source, device), processor, Provenance(kind="random", name=model_name(source)))
    path = Path(str(source)).expanduser()
    if not is_vitreg_folder(path):  # a Hub repo, an official name, or a foreign checkpoint: conversion's business
        from vitreg.conversion.loading import open_foreign

        path, opened = open_foreign(str(source), revision=revision, head=head, progress=progress)
        if opened is not None:
            return opened._replace(model=to_device(opened.model, device))
    elif revision is not None:
        raise UserError(f"--revision applies to Hub repositories, not to the local {source}")
    model = load_vitreg_folder(path, head, str(source))
    provenance = Provenance.load(path) or Provenance(kind="converted", source_file=str(source))
    return OpenedModel(to_device(model, device), folder_processor(path, model.config, provenance), provenance)


def load_vitreg_folder(path: Path, head: str, name: str) -> Any:
    """A ViTReg folder as the `head` class, float32, eval; refusing a folder that lacks the head's weights."""
    import torch

    import vitreg.modeling_vitreg as modeling

    classes = {
        "model": modeling.ViTRegModel,
        "classification": modeling.ViTRegForImageClassification,
        "backbone": modeling.ViTRegBackbone,
    }
    try:
        config = modeling.ViTRegConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"{name} is not a valid ViTReg folder: {first_line(error)}") from None
    if head == "classification" and not any("ForImageClassification" in a for a in config.architectures or []):
        raise UserError(f"{name} has no classification head (its config names {config.architectures})")
    try:
        model, info = classes[head].from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"cannot load the model weights from {name}: {first_line(error)}") from None
    # A classifier folder opened as an encoder has no use for its head; anything else missing is a broken folder.
    missing = [key for key in info["missing_keys"] if "classifier" not in key]
    if missing:
        raise UserError(f"{name} lacks weights the {head} needs, e.g. {sorted(missing)[0]}")
    return model.eval()


def folder_processor(path: Path | None, config: Any, provenance: Provenance | None = None) -> Any:
    """The folder's own image processor when it has a readable one, else the default policy for `config`."""
    if path is not None and Path(path).is_dir() and (Path(path) / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise UserError(f"{path}/preprocessor_config.json cannot be read: {first_line(error)}") from None
    satellite = provenance is not None and is_satellite(provenance.official_name, provenance.source_file)
    return default_processor(config, satellite=satellite)


def to_device(model: Any, device: str | None) -> Any:
    """`model` moved to `device` (None: where it is), refusing a device torch cannot use in one line."""
    if device is None:
        return model
    try:
        return model.to(device)
    except (RuntimeError, AssertionError, ValueError) as error:  # torch asserts on a CUDA it was not built with
        raise UserError(f"cannot use device {device!r}: {first_line(error)}") from None


def model_name(model: Any) -> str:
    """A loaded model's name: the folder or repo it came from, else its class."""
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
