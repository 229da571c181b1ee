"""Any model source as a ViTReg backbone in memory: ViTReg folders load, every other layout is converted on the fly.

    model, processor = load_backbone("timm/vit_small_patch14_reg4_dinov2.lvd142m")  # nothing written to disk
"""

import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModel, BaseImageProcessor

import vitreg.modeling_vitreg  # noqa: F401  (registers ViTReg with the Auto classes)
from vitreg.core.errors import UserError
from vitreg.core.images import image_processor
from vitreg.modeling_vitreg import ViTRegModel

from .converter import build_model, read_source
from .sources import resolve_source

CONVERTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")  # transformers folders the converters read


def folder_config(path: Path) -> dict | None:
    """A folder's `config.json` (None for a file or a folder without one)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{config_file}: not valid JSON ({error})") from None


def load_backbone(
    source: str | Path, *, revision: str | None = None, progress: bool = True
) -> tuple[ViTRegModel, BaseImageProcessor]:
    """Any source as an eval-mode fp32 `ViTRegModel` (converted in memory, nothing written) and its image processor.

    A ViTReg folder or repo loads as it is; DINOv2 files, timm and transformers checkpoints are converted. A head,
    if any, is left out: the tools using this read the backbone's tokens.
    """
    resolved = resolve_source(source, revision=revision, head=False, progress=progress)
    path, config = resolved.path, folder_config(resolved.path)
    if path.is_dir() and config is None and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{resolved.name} is not a model folder (no config.json or weights)")
    model_type = (config or {}).get("model_type")
    if model_type == "vitreg":
        try:
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"cannot load the model weights from {source}: {str(error).splitlines()[0]}") from None
    elif model_type is not None and model_type not in CONVERTED_MODEL_TYPES:
        raise UserError(
            f"{resolved.name} holds a {model_type!r} model, not a ViTReg model or one vitreg converts "
            f"({', '.join(CONVERTED_MODEL_TYPES)}, DINOv2 and timm ViT checkpoints)"
        )
    else:
        conversion, _ = read_source(path)
        conversion.state_dict = {k: v for k, v in conversion.state_dict.items() if not k.startswith("classifier.")}
        model = build_model(conversion, torch.float32, path if path.is_file() else None)
    return model.eval(), processor_of(path)


def processor_of(path: Path) -> BaseImageProcessor:
    """The folder's own image processor, or DINOv2's (a file, a timm repo, a folder without one)."""
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):
            pass
    return image_processor()
