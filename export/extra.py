"""The `[onnx]` extra: what export and the runtime need beyond the model, refused in one line when missing."""

import importlib

from vitreg.core.errors import UserError

EXTRA = "onnx"


def require(*modules: str) -> None:
    """Import each of `modules`, or a UserError naming the missing package and the extra that installs it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            # The same words as `vitreg` itself says for a subcommand whose extra is missing.
            raise UserError(
                f"needs the package {error.name or module!r}, which the [{EXTRA}] extra installs: "
                f"pip install 'vitreg[{EXTRA}]'"
            ) from None
