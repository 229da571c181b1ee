"""Writing a ViTReg folder that is a ready Hub repository: weights, config + remote code, processor, card."""

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from vitreg.core.folders import atomic_output_dir
from vitreg.core.images import default_processor, is_satellite
from vitreg.core.provenance import Provenance

from .card import write_card


def save_model_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    provenance: Provenance,
    *,
    overwrite: bool = False,
    processor: Any = None,
    crop_size: int = 224,
    max_shard_size: str = "5GB",
    write_weights: Callable[[Path], object] | None = None,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write `model` as a Hub-ready folder (safetensors, config with auto_map + code, processor, card), atomically.

    `processor`: the source's own image processor, kept as it is; without one the folder gets the policy every tool
    opens models with (`vitreg.core.images.default_processor`: DINOv3's for RoPE, DINOv2's otherwise, SAT-493M's
    statistics for satellite weights) at `crop_size`. `write_weights(folder)`, when given, writes the weights in
    place of `model`'s own (which may then live on the meta device), e.g. streamed from a memory-mapped checkpoint.
    `inputs`: paths the output folder must not hold (the source being converted).
    """
    output_dir = Path(output_dir)
    if processor is None:
        satellite = is_satellite(provenance.official_name, provenance.source_file)
        processor = default_processor(model.config, satellite=satellite, crop_size=crop_size)
    with atomic_output_dir(output_dir, overwrite, inputs) as staging:
        if write_weights is None:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(staging, state_dict={})  # config.json with auto_map and the remote code, no weights
            write_weights(staging)
        processor.save_pretrained(staging)
        write_card(staging, provenance)
    return output_dir
