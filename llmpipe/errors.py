"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad config, a missing or corrupt input, a stage run out of order."""


class BadValue(UserError, ValueError):
    """A config value or argument outside what is allowed."""


class MissingInput(UserError, FileNotFoundError):
    """An input file or folder that should exist does not."""
