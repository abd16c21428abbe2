"""
Tricks switched for one test (L{tunneld.speedups}), and the end-to-end
suite with every trick off.
"""

from __future__ import annotations

import importlib
from typing import Any

from tunneld import speedups
from tunneld.speedups.switches import Trick


def switch_tricks(case: Any, on: bool, *names: str) -> None:
    """Switch the named tricks (every one when none is named) on or off until C{case} ends."""
    for trick in [speedups.trick(name) for name in names] if names else speedups.tricks():
        case.addCleanup(trick.switch, trick.active)
        trick.switch(on)


class TricksOff:
    """
    Mixed in before a transport's L{tests.end_to_end.EndToEndMixin} case:
    each test runs with every trick off, so every fallback to the public
    APIs carries the whole suite.
    """

    def setUp(self) -> Any:
        switch_tricks(self, False)
        for trick in speedups.tricks():
            assert not trick.active, trick
        return super().setUp()  # type: ignore[misc]


def unavailable(name: str) -> str | None:
    """Why the installed library does not allow the trick (a skip reason), or None when it does."""
    problem = speedups.trick(name).problem
    return None if problem is None else f"{name} falls back here: {problem}"


def stand_in_tricks(case: Any) -> None:
    """Until C{case} ends, every trick is a stand-in whose check passes (whatever is installed)."""
    for name, module in speedups.MODULES.items():
        case.patch(importlib.import_module(module), "TRICK", Trick(name, "", "", lambda: None))
