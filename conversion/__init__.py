"""Checkpoint conversion: DINOv2 (hub and training), timm and transformers checkpoints <-> ViTReg folders.

from vitreg.conversion import convert, write_random_checkpoint
write_random_checkpoint("dinov2_vits14_reg4_pretrain.pth", "dinov2_vits14_reg4", hidden_size=64)
convert("dinov2_vits14_reg4_pretrain.pth", "dinov2-vits14-reg4", verify=True)
"""

from .architectures import OFFICIAL_ARCHITECTURES, official_config
from .checkpoints import load_tensors, random_head_state_dict, random_official_state_dict, write_random_checkpoint
from .converter import build_model, convert, convert_batch, export_dinov2, read_source
from .layouts import Conversion, to_dinov2

__all__ = [
    "OFFICIAL_ARCHITECTURES",
    "Conversion",
    "build_model",
    "convert",
    "convert_batch",
    "official_config",
    "export_dinov2",
    "load_tensors",
    "random_head_state_dict",
    "random_official_state_dict",
    "read_source",
    "to_dinov2",
    "write_random_checkpoint",
]
