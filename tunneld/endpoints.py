# -*- test-case-name: tests.test_config,tests.test_listening,tests.test_systemd -*-
"""
Endpoint strings: checked when the configuration is read, and listened on
with the address family the socket really has.

Listeners and upstreams are Twisted endpoint strings (C{tcp:}, C{unix:},
C{ssl:}, C{systemd:} ...).  Twisted parses one only when it is used, so a
typo (C{tpc:8000}) would surface as a traceback at start or, for an agent's
upstream, at its first request; the checks here parse each string when the
file is read, so the mistake is reported like any other bad value.

C{systemd:} strings name a socket the service manager passes, with the
address family the configuration I{says} it has.  A unit's C{ListenStream=80}
makes an IPv6 (dual-stack) socket; adopted as C{domain=INET}, every address
read from it is garbage.  L{listen_endpoint} adopts the socket with the
family the kernel reports and says when the string disagrees.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from typing import Any

from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint

SERVER_EXAMPLE = "tcp:8080:interface=127.0.0.1"
CLIENT_EXAMPLE = "tcp:host=127.0.0.1:port=8000"
SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def _kind(description: str) -> str:
    return description.split(":", 1)[0].strip()


def _reason(error: Exception) -> str:
    """Twisted's parser errors, said without the names of its private functions."""
    text = str(error)
    if isinstance(error, TypeError):
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
        if unexpected:
            return f"unknown parameter {unexpected.group(1)!r}"
        missing = re.search(r"missing \d+ required positional arguments?: (.*)$", text)
        if missing:
            names = re.findall(r"'(\w+)'", missing.group(1))
            return "missing " + ", ".join(f"{name}=" for name in names)
    if isinstance(error, KeyError):
        return f"missing {error.args[0]}="
    number = re.match(r"invalid literal for int\(\) with base 10: (.*)$", text)
    if number:
        return f"{number.group(1)} is not a number"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or ''}: {error.strerror}".lstrip(": ")
    return text or type(error).__name__


def _split(description: str) -> list[str]:
    """An endpoint string's colon-separated parts, honouring backslash escapes."""
    parts, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def systemd_problem(description: str) -> str | None:
    """
    What is wrong with a C{systemd:} string, checked without the sockets
    (they exist only in the process systemd starts; their absence is
    reported when the listener starts).
    """
    params: dict[str, str] = {}
    for part in _split(description)[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            return f"systemd: takes key=value parameters (domain=, index= or name=), got {part!r}"
        if key not in ("domain", "index", "name"):
            return f"systemd: unknown parameter {key!r}"
        params[key] = value
    domain = params.get("domain")
    if domain not in SYSTEMD_DOMAINS:
        return f"systemd: domain= must be one of {', '.join(SYSTEMD_DOMAINS)}, got {domain!r}"
    if ("index" in params) == ("name" in params):
        return "systemd: give exactly one of index= (0 for the first socket) or name="
    index = params.get("index")
    if index is not None and not index.isdigit():
        return f"systemd: index= must be 0 or more, got {index!r}"
    return None


def server_endpoint_problem(description: str) -> str | None:
    """A config check: what is wrong with a listener's endpoint string, if anything."""
    kind = _kind(description)
    if kind == "systemd":
        return systemd_problem(description)
    try:
        # Parsing builds the endpoint object and nothing else: the reactor
        # is only used when it listens.
        serverFromString(None, description)
    except Exception as e:  # any parser error is the string's fault
        return _problem(description, kind, e, SERVER_EXAMPLE)
    return None


def optional_server_endpoint_problem(description: str) -> str | None:
    """As L{server_endpoint_problem}; C{""} (the listener is off) is fine."""
    return server_endpoint_problem(description) if description else None


def client_endpoint_problem(description: str) -> str | None:
    """A config check: what is wrong with an upstream's (client) endpoint string."""
    kind = _kind(description)
    try:
        with warnings.catch_warnings():
            # tls: endpoints warn that no resolver-capable reactor was given.
            warnings.simplefilter("ignore", DeprecationWarning)
            clientFromString(None, description)
    except Exception as e:  # any parser error is the string's fault
        return _problem(description, kind, e, CLIENT_EXAMPLE)
    return None


def _problem(description: str, kind: str, error: Exception, example: str) -> str:
    if isinstance(error, ValueError) and str(error).startswith("Unknown endpoint type"):
        return f"unknown endpoint type {kind!r} in {description!r} (e.g. {example!r})"
    return f"not a valid {kind}: endpoint: {_reason(error)} (e.g. {example!r})"


def socket_family(fileno: int) -> int:
    """The address family of an open socket, as the kernel reports it."""
    probe = socket.socket(fileno=os.dup(fileno))
    try:
        return int(probe.family)
    finally:
        probe.close()


_FAMILIES: dict[int, str] = {socket.AF_INET: "INET", socket.AF_INET6: "INET6", socket.AF_UNIX: "UNIX"}


def family_name(family: int) -> str:
    """C{INET}, C{INET6} or C{UNIX}: the family as a C{systemd:} string's C{domain=} names it."""
    return _FAMILIES.get(family, str(family))


def listen_endpoint(reactor: Any, description: str) -> tuple[IStreamServerEndpoint, str | None]:
    """
    The endpoint to listen on for C{description}, and a note for the log
    when an adopted (C{systemd:}) socket's real family differs from the
    string's C{domain=}: the socket is then adopted with its real family.
    Raises L{IndexError} or L{KeyError} when systemd passed no such socket.
    """
    endpoint = serverFromString(reactor, description)
    if not isinstance(endpoint, AdoptedStreamServerEndpoint):
        return endpoint, None
    real = socket_family(endpoint.fileno)
    if real == endpoint.addressFamily:
        return endpoint, None
    note = (
        f"{description!r} says domain={family_name(endpoint.addressFamily)} but the socket "
        f"systemd passed is {family_name(real)}: using it as {family_name(real)} "
        f"(write domain={family_name(real)} to match)"
    )
    return AdoptedStreamServerEndpoint(reactor, endpoint.fileno, real), note
