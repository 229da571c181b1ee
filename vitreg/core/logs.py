"""What ViTReg's commands show of the library's logs: its INFO messages, on the current stderr."""

import logging
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler writing to `sys.stderr` as it is at each message (callers and tests may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the property always answers the current stderr
        pass


def show_library_logs() -> None:
    """Library functions log through `vitreg.*` loggers; the command shows their INFO messages on stderr."""
    logger = logging.getLogger("vitreg")
    if not any(isinstance(handler, CurrentStderrHandler) for handler in logger.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
