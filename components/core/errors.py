"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A mistake in input, configuration or environment that the user can correct."""


class ConfigError(UserError):
    """A configuration file that does not validate; the message names the file and the fields."""
