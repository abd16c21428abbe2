# -*- test-case-name: tests.test_observe -*-
"""
The agent's console for a person: a live one-line summary of link state,
requests and bytes, redrawn every second when stdout is a terminal (and
absent when it is not, so logs to files and journald stay clean).

Public URLs and link state changes are log events already; the summary line
is kept below them: it is drawn, then the cursor returns to the line's start,
and it is drawn again after every log event.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

from tunneld.interfaces import IStream, IStreamReceiver
from tunneld.model.messages import Headers, ReplyHead, StreamHead
from tunneld.model.reasons import Reason


class AgentActivity:
    """What the agent carried: streams, bytes each way."""

    def __init__(self) -> None:
        self.requests = 0
        self.active = 0
        self.bytes_in = 0  # from the edge towards the upstream (request bodies)
        self.bytes_out = 0  # from the upstream towards the edge (reply bodies)

    def wrap(self, stream: IStream) -> IStream:
        """C{stream}, counted (the AgentService.stream_hook)."""
        self.requests += 1
        self.active += 1
        return _CountingStream(self, stream)


@implementer(IStreamReceiver)
class _CountingReceiver:
    __slots__ = ("_activity", "_receiver", "_open")

    def __init__(self, activity: AgentActivity, receiver: IStreamReceiver) -> None:
        self._activity = activity
        self._receiver = receiver
        self._open = True

    def _done(self) -> None:
        if self._open:
            self._open = False
            self._activity.active -= 1

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received"""
        self._receiver.reply_received(reply)

    def data_received(self, data: bytes) -> None:
        """IStreamReceiver.data_received"""
        self._activity.bytes_in += len(data)
        self._receiver.data_received(data)

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received"""
        self._done()
        self._receiver.end_received(trailers)

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received"""
        self._done()
        self._receiver.reset_received(reason, message)


@implementer(IStream)
class _CountingStream:
    """An L{IStream} that counts what passes and otherwise defers to the real one."""

    def __init__(self, activity: AgentActivity, stream: IStream) -> None:
        self._activity = activity
        self._stream = stream
        self._receiver: _CountingReceiver | None = None

    @property
    def head(self) -> StreamHead:
        return self._stream.head

    @head.setter
    def head(self, head: StreamHead) -> None:
        self._stream.head = head

    def _done(self) -> None:
        if self._receiver is not None:
            self._receiver._done()

    def attach(self, receiver: IStreamReceiver) -> None:
        """IStream.attach"""
        self._receiver = _CountingReceiver(self._activity, receiver)
        self._stream.attach(self._receiver)

    def send_reply(self, reply: ReplyHead) -> None:
        """IStream.send_reply"""
        self._stream.send_reply(reply)

    def write(self, data: bytes) -> None:
        """IConsumer.write"""
        self._activity.bytes_out += len(data)
        self._stream.write(data)

    def writeSequence(self, data: list[bytes]) -> None:  # noqa: N802
        """IConsumer.writeSequence"""
        self._activity.bytes_out += sum(map(len, data))
        self._stream.write(b"".join(data))

    def end(self, trailers: Headers = ()) -> None:
        """IStream.end"""
        self._stream.end(trailers)

    def reset(self, reason: Reason, message: str) -> None:
        """IStream.reset"""
        self._done()
        self._stream.reset(reason, message)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """IConsumer.registerProducer"""
        self._stream.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:  # noqa: N802
        """IConsumer.unregisterProducer"""
        self._stream.unregisterProducer()

    def pauseProducing(self) -> None:  # noqa: N802
        """IPushProducer.pauseProducing"""
        self._stream.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        """IPushProducer.resumeProducing"""
        self._stream.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        """IPushProducer.stopProducing"""
        self._done()
        self._stream.stopProducing()


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}TB"


def summary_line(agent: Any, activity: AgentActivity) -> str:
    """
    The one line: link state, requests, open streams, bytes each way.  Until
    the edge first welcomes the agent the link is not "down", it is still
    being set up.
    """
    link = agent.link
    ready = getattr(agent, "ready", None)
    welcomed = ready is not None and ready.called
    if not welcomed:
        state = "connecting to the edge"
    elif link is not None:
        state = f"link up over {link.transport_name}"
    else:
        state = "link down, reconnecting"
    return (
        f"{state} | {activity.requests} req, {activity.active} open | "
        f"in {human_bytes(activity.bytes_in)} out {human_bytes(activity.bytes_out)}"
    )


class ConsoleSummary(Service):
    """Redraws the summary line every C{interval} seconds while C{out} is a terminal."""

    name = "console-summary"

    def __init__(
        self, reactor: Any, agent: Any, activity: AgentActivity,
        out: IO[str] | None = None, interval: float = 1.0, force: bool = False,
    ) -> None:
        self.reactor = reactor
        self.agent = agent
        self.activity = activity
        self.out = out if out is not None else sys.stdout
        self.interval = interval
        isatty = getattr(self.out, "isatty", None)
        self.enabled = force or bool(isatty is not None and isatty())
        self._loop: LoopingCall | None = None

    def draw(self) -> None:
        if not self.enabled:
            return
        self.out.write("\x1b[K" + summary_line(self.agent, self.activity) + "\r")
        self.out.flush()

    @implementer(ILogObserver)
    def _after_log_event(self, event: dict[str, Any]) -> None:
        self.draw()

    def startService(self) -> None:  # noqa: N802
        Service.startService(self)
        if not self.enabled:
            return
        globalLogPublisher.addObserver(self._after_log_event)
        self._loop = LoopingCall(self.draw)
        self._loop.clock = self.reactor
        self._loop.start(self.interval)

    def stopService(self) -> Any:  # noqa: N802
        Service.stopService(self)
        if self._loop is not None:
            globalLogPublisher.removeObserver(self._after_log_event)
            if self._loop.running:
                self._loop.stop()
            self._loop = None
            self.out.write("\x1b[K\n")
            self.out.flush()
        return None
