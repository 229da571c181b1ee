"""Model cards and Hub-ready folders for everything ViTReg writes, built on huggingface_hub's ModelCard.

The names below load on first use, so `vitreg.model_cards.registry` (the official-model table) imports without
torch or transformers.
"""

import importlib

_EXPORTS = {
    "build_card": ".card",
    "read_provenance": ".card",
    "write_card": ".card",
    "save_model_folder": ".folder",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
