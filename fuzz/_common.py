"""Shared by the atheris harnesses: split fuzz input into pieces."""

from __future__ import annotations

from typing import Any


def pieces(fdp: Any, limit: int = 64) -> list[bytes]:
    """
    Consume the input as up to C{limit} non-empty pieces (a transport never
    delivers an empty read: to h11 that would mean end of input).
    """
    out = []
    while fdp.remaining_bytes() and len(out) < limit:
        size = fdp.ConsumeIntInRange(1, 4096)
        piece = fdp.ConsumeBytes(size)
        if piece:
            out.append(piece)
    return out
