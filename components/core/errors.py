"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

import re

# The user-info part of any URI (`https://user:token@host`, `postgresql://user:pass@db`): a secret.
_CREDENTIALS_IN_URI = re.compile(r"(?<=://)[^/\s@]+@")


def redacted(text: str) -> str:
    """`text` with the credentials of every URI in it replaced by `***`."""
    return _CREDENTIALS_IN_URI.sub("***@", text)


class UserError(Exception):
    """A mistake in input, configuration or environment that the user can correct.

    Its message never shows credentials: they are redacted however the message was put together."""

    def __str__(self) -> str:
        return redacted(super().__str__())


class ConfigError(UserError):
    """A configuration file that does not validate; the message names the file and the fields."""
