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


class StartupError(Exception):
    """
    Something the process needs at start is missing (a listener that cannot
    listen, a socket systemd did not pass).  The process stops with this
    message; nothing was half-started for anyone to rely on.
    """


class InvalidTransport(StartupError):
    """
    An installed transport plugin cannot be used (its module fails to
    import, it does not provide the interface it claims, its name is taken):
    the message names the plugin, so a broken drop-in is never skipped
    silently.
    """


class ListenError(StartupError):
    """A listener could not listen: which one (config key), where, and the OS's reason."""

    def __init__(self, key: str, role: str, description: str, reason: str) -> None:
        self.key = key
        self.role = role
        self.description = description
        self.reason = reason
        where = f"{key}: " if key else ""
        super().__init__(f"{where}{role} cannot listen on {description}: {reason}")
