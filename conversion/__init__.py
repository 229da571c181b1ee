"""Checkpoint conversion: DINOv2 (hub and training), DINOv3 (hub), timm and transformers checkpoints <-> ViTReg folders.

from vitreg.conversion import convert, write_random_checkpoint
write_random_checkpoint("dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14_reg4", hidden_size=64)
convert("dinov2_vits14_reg4_pretrain.pth", "dinov2-vits14-reg4", verify=True)
convert("facebook/dinov2-with-registers-small", "dinov2-reg-small")  # a Hub repo (or "dinov2_vits14_reg4": official)
model, processor, provenance = vitreg.core.open_model("facebook/dinov2-base")  # converted in memory
"""

from .architectures import OFFICIAL_ARCHITECTURES, official_config
from .checkpoints import load_tensors, random_head_state_dict, random_official_state_dict, write_random_checkpoint
from .converter import build_model, convert, convert_batch, export_dinov2, export_official, read_source
from .dinov3 import dinov3_shapes, random_dinov3_state_dict, to_dinov3, write_random_dinov3_checkpoint
from .layouts import Conversion, to_dinov2
from .loading import open_foreign
from .sources import Source, resolve_source

__all__ = [
    "OFFICIAL_ARCHITECTURES",
    "Conversion",
    "Source",
    "build_model",
    "convert",
    "convert_batch",
    "official_config",
    "dinov3_shapes",
    "export_dinov2",
    "export_official",
    "load_tensors",
    "open_foreign",
    "random_head_state_dict",
    "random_dinov3_state_dict",
    "random_official_state_dict",
    "read_source",
    "resolve_source",
    "to_dinov2",
    "to_dinov3",
    "write_random_checkpoint",
    "write_random_dinov3_checkpoint",
]
