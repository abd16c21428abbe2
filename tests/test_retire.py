"""Retirement: a drained link closes once its last stream ends, or at its deadline, and leaves no timer."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld.model.reasons import Reason
from tunneld.retire import POLL, Retirement


class FakeLink:
    """The part of an IAgentLink a retirement uses."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.closed: list[tuple[Reason, str]] = []
        self._waiters: list[Deferred[None]] = []

    def active_streams(self) -> int:
        return self.streams

    def close(self, reason: Reason, message: str) -> None:
        self.closed.append((reason, message))

    def when_closed(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def lost(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class RetirementTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def retire(self, link: Any, within: float = 30.0) -> Retirement:
        return Retirement(self.clock, link, self.clock.seconds() + within, Reason.DRAINING, "moved")

    def test_idle_link_closes_at_once(self) -> None:
        """A link with no stream closes as it is retired, with the reason given."""
        link = FakeLink(0)
        self.retire(link)
        self.assertEqual(link.closed, [(Reason.DRAINING, "moved")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closes_when_the_last_stream_ends(self) -> None:
        """A link keeps its streams, and closes within one poll of the last one ending."""
        link = FakeLink(2)
        self.retire(link)
        self.clock.pump([POLL] * 50)
        self.assertEqual(link.closed, [])
        link.streams = 0
        self.clock.advance(POLL)
        self.assertEqual(link.closed, [(Reason.DRAINING, "moved")])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        """Streams still open at the deadline are closed with the link."""
        link = FakeLink(1)
        self.retire(link, within=2.0)
        self.clock.pump([POLL] * 19)
        self.assertEqual(link.closed, [])
        self.clock.pump([POLL] * 2)
        self.assertEqual(len(link.closed), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_link_closed_otherwise(self) -> None:
        """A link that closes some other way stops the retirement: no timer is left."""
        link = FakeLink(1)
        retirement = self.retire(link)
        link.lost()
        self.assertTrue(retirement.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(link.closed, [])

    def test_already_closed_link(self) -> None:
        """Retiring a link that is gone already does nothing."""
        link = FakeLink(1)
        link.when_closed = lambda: succeed(None)  # type: ignore[method-assign]
        self.retire(link)
        self.assertEqual((link.closed, self.clock.getDelayedCalls()), ([], []))

    def test_cancel(self) -> None:
        """cancel() leaves the link open and no timer behind."""
        link = FakeLink(1)
        self.retire(link).cancel()
        self.assertEqual((link.closed, self.clock.getDelayedCalls()), ([], []))
