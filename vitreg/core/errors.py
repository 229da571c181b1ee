"""The one exception type for expected, user-caused failures: the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """Bad input (a missing or corrupt file, a bad flag or value): the message says what is wrong."""


def missing_extra(package: str, extra: str) -> UserError:
    """The one-line error for an optional package that is not installed, naming the extra that installs it."""
    install = f"pip install 'vitreg[{extra}]'"
    return UserError(f"needs the package {package!r}, which the [{extra}] extra installs: {install}")


def require(*modules: str, extra: str):
    """Import `modules` and return the last, or raise `missing_extra` for the first one that is not installed."""
    import importlib

    module = None
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if (error.name or name).split(".")[0] != name.split(".")[0]:
                raise  # a bug inside the package, not a missing one
            raise missing_extra(error.name or name, extra) from None
    return module
