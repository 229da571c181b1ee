"""Writing a ViTReg folder that is a ready Hub repository: weights, config + remote code, processor, card."""

from collections.abc import Callable
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
    write_weights: Callable[[Path], object] | None = None,
) -> Path:
    """Write `model` as a Hub-ready folder (safetensors, config with auto_map + code, processor, card), atomically.

    `write_weights(folder)`, when given, writes the weights in place of `model`'s own (which may then live on the
    meta device), e.g. streamed from a memory-mapped checkpoint.
    """
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite) as staging:
        if write_weights is None:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(staging, state_dict={})  # config.json with auto_map and the remote code, no weights
            write_weights(staging)
        image_processor(crop_size, square=model.config.uses_rope).save_pretrained(staging)  # RoPE: DINOv3's
        write_card(staging, provenance)
    return output_dir
