"""The feature columns of `vitreg extract`: which tokens go where, their shapes and their Arrow types.

Tokens come as `[CLS, registers, patches]`, the registers being the trained ones then the test-time ones; the model
cuts them (`split_tokens`, `get_intermediate_layers`) with its one notion of prefix tokens, so registers never end
up among (or averaged into) the patch features.
"""

import numpy as np
import torch

from vitreg.core.errors import UserError
from vitreg.core.flags import parse_layers
from vitreg.modeling_vitreg import ViTRegConfig

from .backends import Tokens

WHAT = ("cls", "patch", "registers", "pooled")


def num_registers(config: ViTRegConfig) -> int:
    """Register tokens of every image: the trained ones and the test-time ones (all the prefix but the CLS token)."""
    return config.num_prefix_tokens - int(config.use_cls_token)


def parse_what(text: str | list[str]) -> list[str]:
    """`"cls,patch"` -> `["cls", "patch"]`, refusing unknown names."""
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    unknown = [name for name in names if name not in WHAT]
    if unknown or not names:
        raise UserError(f"--what takes a comma-separated list of {', '.join(WHAT)}; got {text!r}")
    return list(dict.fromkeys(names))


def check_request(config: ViTRegConfig, what: list[str], layers: str | list[int] | None) -> list[int] | None:
    """Refuse what the model cannot give; `layers` (`"0,5,10-11"`, `"-1"` or a list) as sorted 0-based blocks."""
    if "registers" in what and not num_registers(config):
        raise UserError("the model has no register tokens: drop 'registers' from --what")
    if "cls" in what and not config.use_cls_token:
        raise UserError("the model has no CLS token: drop 'cls' from --what")
    if layers is None:
        return None
    if "pooled" in what:
        raise UserError("'pooled' is the final output's: drop it from --what or drop --layers")
    return parse_layers(layers, config.num_hidden_layers)


def column_shapes(config: ViTRegConfig, what: list[str], num_patches: int, num_layers: int | None) -> dict:
    """Shape of one image's value in each column; with `layers`, a leading axis of one entry per layer."""
    dim = config.hidden_size
    shapes = {"cls": (dim,), "registers": (num_registers(config), dim), "patch": (num_patches, dim)}
    shapes["pooled"] = (dim,)  # never with layers (check_request)
    lead = (num_layers,) if num_layers is not None else ()
    return {name: lead + shapes[name] for name in what}


def arrow_features(shapes: dict, dtype: str, others: dict | None = None):
    """The `datasets.Features` of the output: an `id` string, the source dataset's `others` columns as they were,
    then one fixed-shape array column per feature."""
    from datasets import Array2D, Array3D, Array4D, Features, Sequence, Value

    arrays = {2: Array2D, 3: Array3D, 4: Array4D}
    features = {"id": Value("string"), **(others or {})}
    for name, shape in shapes.items():
        single = len(shape) == 1
        features[name] = Sequence(Value(dtype), length=shape[0]) if single else arrays[len(shape)](shape, dtype)
    return Features(features)


def columns(tokens: Tokens, what: list[str], dtype: np.dtype) -> dict[str, np.ndarray]:
    """One batch's feature columns as numpy arrays `[B, ...]` of the stored dtype."""
    parts = {"cls": tokens.cls, "registers": tokens.registers, "patch": tokens.patches}
    single = tokens.pooled is not None  # the final output: no layer axis
    out = {}
    for name in what:
        if name == "pooled":
            value = tokens.pooled  # [B, D]
        else:
            value = parts[name][0] if single else torch.stack(parts[name], dim=1)  # [B, L, ...] with layers
        out[name] = value.float().cpu().numpy().astype(dtype, copy=False)
    return out
