"""The one exception type for expected, user-caused failures: the CLI prints it as one line, no traceback."""


class UserError(Exception):
    """Bad input (a missing or corrupt file, a bad flag or value): the message says what is wrong."""
