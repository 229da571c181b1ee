"""Writing a ViTReg folder that is a ready Hub repository: weights, config + remote code, processor, card."""

from pathlib import Path

from transformers import PreTrainedModel

from vitreg.core.folders import atomic_output_dir
from vitreg.core.images import image_processor
from vitreg.core.provenance import Provenance

from .card import write_card


def save_model_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    provenance: Provenance,
    *,
    overwrite: bool = False,
    crop_size: int = 224,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` as a Hub-ready folder (safetensors, config with auto_map + code, processor, card), atomically."""
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        image_processor(crop_size).save_pretrained(staging)
        write_card(staging, provenance)
    return output_dir
