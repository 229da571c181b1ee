"""Artifact analysis: high-norm tokens, CLS attention and LOST object discovery, with and without registers."""

from .artifacts import ImageAnalysis, ModelAnalysis, analyze, analyze_image
from .loading import collect_images
from .lost import LostError, LostResult, corloc, lost, lost_image, read_voc
from .report import model_record, run_analysis
from .threshold import auto_threshold

__all__ = [
    "ImageAnalysis",
    "LostError",
    "LostResult",
    "ModelAnalysis",
    "analyze",
    "analyze_image",
    "auto_threshold",
    "collect_images",
    "corloc",
    "lost",
    "lost_image",
    "model_record",
    "read_voc",
    "run_analysis",
]
