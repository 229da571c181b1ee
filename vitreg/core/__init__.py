"""What every ViTReg tool shares, below all of them: the error type, folder writing, provenance, preprocessing."""

from .errors import UserError
from .folders import atomic_output_dir, atomic_output_file, check_output_dir
from .images import IMAGENET_MEAN, IMAGENET_STD, image_processor, sample_images, sample_photos
from .provenance import Provenance

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Provenance",
    "UserError",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "image_processor",
    "sample_images",
    "sample_photos",
]
