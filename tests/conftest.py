"""Shared fixtures: everything offline, tiny configs, real photos shipped by scikit-image."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import vitreg.modeling_vitreg  # noqa: E402,F401  (registers the Auto classes)
from PIL import Image  # noqa: E402
from vitreg.modeling_vitreg import ViTRegConfig  # noqa: E402


def tiny_config(**overrides) -> ViTRegConfig:
    """A 2-block, 32-wide ViTReg on 28 px images (2x2 grid of 14 px patches): fast everywhere."""
    fields = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        num_register_tokens=4,
        layerscale_value=0.5,
    )
    fields.update(overrides)
    return ViTRegConfig(**fields)


@pytest.fixture
def config() -> ViTRegConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    """Real photographs that scikit-image ships (no download)."""
    from skimage import data

    return [Image.fromarray(np.asarray(getattr(data, name)())) for name in ("astronaut", "chelsea", "coffee", "rocket")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
