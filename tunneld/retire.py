# -*- test-case-name: tests.test_retire -*-
"""
Retiring an agent link: it takes no new streams, and closes once its last
stream has ended, or at a deadline.

Both ends retire links: the edge a session it drained (an operator's
C{POST /api/agents/SESSION/drain}, or the agent saying it is moving), the
agent the link it moved off (the edge said C{draining}, or its preferred
transport came back).  Without it a drained link stays open for good,
holding its sockets and counting against the agent caps.
"""

from __future__ import annotations

from typing import Any

from tunneld.interfaces import IAgentLink
from tunneld.model.reasons import Reason

# How often a retiring link is looked at: its streams are counted, not
# followed, so a link with none left closes within this.
POLL = 0.1


class Retirement:
    """Close C{link} with C{reason} once it carries no stream, or at C{deadline} (reactor time)."""

    def __init__(
        self, reactor: Any, link: IAgentLink, deadline: float, reason: Reason, message: str
    ) -> None:
        self.reactor = reactor
        self.link = link
        self.deadline = deadline
        self.reason = reason
        self.message = message
        self.done = False
        self._call: Any = None
        link.when_closed().addCallback(lambda _: self.cancel())
        self._check()

    def _check(self) -> None:
        self._call = None
        if self.done:
            return
        if self.link.active_streams() == 0 or self.reactor.seconds() >= self.deadline:
            self.done = True
            self.link.close(self.reason, self.message)
            return
        self._call = self.reactor.callLater(POLL, self._check)

    def cancel(self) -> None:
        """Stop watching (the link closed some other way, or the service stops)."""
        self.done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
