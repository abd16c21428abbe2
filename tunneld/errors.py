"""Exceptions that mean a person must fix something before tunneld can run."""

from __future__ import annotations


class ConfigError(Exception):
    """
    A configuration value is wrong.  The message names the file, the key and
    the reason, because the person reading it has only that to go on.
    """

    def __init__(self, where: str, key: str, reason: str) -> None:
        self.where = where
        self.key = key
        self.reason = reason
        super().__init__(f"{where}: {key}: {reason}")


class MissingTransport(ConfigError):
    """A transport named in the configuration is not installed as a plugin."""
