"""Opening a source that is not a ViTReg folder: resolved by name, converted in memory, nothing written.

`vitreg.core.opening.open_model` is the one way every tool opens a model; it comes here only for what needs
conversion (Hub repos, official names, DINOv2 / DINOv3 / timm / transformers checkpoints).
"""

from pathlib import Path

import torch

from vitreg.core.errors import UserError
from vitreg.core.opening import OpenedModel, folder_config, folder_processor, is_vitreg_folder

from .converter import build_model, provenance_of, read_source
from .sources import resolve_source

CONVERTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")  # transformers folders the converters read


def open_foreign(
    source: str, *, revision: str | None = None, head: str = "model", progress: bool = True
) -> tuple[Path, OpenedModel | None]:
    """Resolve `source`; a ViTReg folder or repo comes back as `(path, None)` for the caller to load, anything else
    is converted in memory to `head` (`model`, `classification`, `backbone`) and comes back opened."""
    resolved = resolve_source(source, revision=revision, head=False, progress=progress)
    path = resolved.path
    if is_vitreg_folder(path):
        return path, None
    config = folder_config(path) if path.is_dir() else None
    if path.is_dir() and config is None and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"{resolved.name} is not a model folder (no config.json or weights)")
    model_type = (config or {}).get("model_type")
    if model_type is not None and model_type not in CONVERTED_MODEL_TYPES:
        raise UserError(
            f"{resolved.name} holds a {model_type!r} model, not a ViTReg model or one vitreg converts "
            f"({', '.join(CONVERTED_MODEL_TYPES)}, DINOv2, DINOv3 and timm ViT checkpoints)"
        )
    conversion, _ = read_source(path)
    has_head = any(key.startswith("classifier.") for key in conversion.state_dict)
    if head == "classification" and not has_head:
        raise UserError(f"{resolved.name} has no classification head")
    if head != "classification":
        conversion.state_dict = {k: v for k, v in conversion.state_dict.items() if not k.startswith("classifier.")}
    model = build_model(conversion, torch.float32, path if path.is_file() else None)
    if head == "backbone":
        from vitreg.modeling_vitreg import ViTRegBackbone

        backbone = ViTRegBackbone(model.config)
        backbone.load_state_dict(model.state_dict())
        model = backbone
    provenance = provenance_of(path, conversion, None, progress, hash_files=False)
    provenance.source_file = resolved.name
    return path, OpenedModel(model.eval(), folder_processor(path, model.config, provenance), provenance)
