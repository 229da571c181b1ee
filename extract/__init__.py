"""Features of a folder of images or a `datasets` dataset, written as a resumable Arrow dataset (`vitreg extract`).

from vitreg.extract import extract_features, load_features
extract_features("facebook/dinov2-with-registers-small", "photos", "features", what="cls,patch")
features = load_features("features")  # a datasets.Dataset: id, (a dataset's other columns,) cls [D], patch [HW, D]
"""

from .backends import BACKENDS, Tokens
from .extractor import extract_features
from .output import load_features

__all__ = ["BACKENDS", "Tokens", "extract_features", "load_features"]
