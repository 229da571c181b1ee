"""What every ViTReg tool shares, below all of them: errors, flags, folder writing, provenance, preprocessing, and
the one way to open a model.

Names are imported on first use, so `import vitreg.core` (and `vitreg --help`) loads neither torch nor transformers.
"""

import importlib

_EXPORTS = {
    "UserError": "errors",
    "add_common_flags": "flags",
    "apply_common_flags": "flags",
    "parse_layers": "flags",
    "spellings": "flags",
    "atomic_output_dir": "folders",
    "atomic_output_file": "folders",
    "check_output_dir": "folders",
    "IMAGENET_MEAN": "images",
    "IMAGENET_STD": "images",
    "SATELLITE_MEAN": "images",
    "SATELLITE_STD": "images",
    "check_image_size": "images",
    "default_processor": "images",
    "image_processor": "images",
    "sample_images": "images",
    "sample_photos": "images",
    "size_options": "images",
    "HEADS": "opening",
    "OpenedModel": "opening",
    "is_vitreg_folder": "opening",
    "open_model": "opening",
    "Provenance": "provenance",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
