# -*- test-case-name: tests.test_terminal -*-
"""
The agent's terminal service: a stream of kind C{"terminal"} becomes a
program on a PTY (Twisted's C{spawnProcess} with C{usePTY}), opt-in through
C{[agent.terminal]}.

The stream carries records (L{tunneld.wire.terminal}): keystrokes and
resizes from the edge, the PTY's output back, a close with a reason either
way, heartbeats.  Backpressure is wiring, as for TCP: the PTY is the
stream's producer (no credit, no reading from the PTY: the program blocks
on its writes) and the stream is the PTY's (a PTY that takes no more input
stops the edge's credit).

Every end reaps the child: the program exiting by itself (its status goes
to the edge as C{exited}), the edge closing the session, the stream being
reset (the link lost), the agent stopping.  The child is hung up (SIGHUP),
then killed (SIGKILL) after C{close_grace}; processes left in its session
(jobs a shell did not take with it) are killed too.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import struct
import termios
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ConnectionDone, ProcessExitedAlready
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tunneld.config import AgentTerminal
from tunneld.interfaces import IStream, IStreamReceiver, IUpstream
from tunneld.model.messages import Headers, ReplyHead
from tunneld.model.reasons import Reason
from tunneld.wire.terminal import (
    Close,
    Heartbeat,
    Output,
    Ready,
    RecordError,
    RecordReader,
    Resize,
    encode,
    encode_output,
)

_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Program:
    """What a terminal runs, resolved once at start from C{[agent.terminal]}."""

    executable: str
    args: tuple[str, ...]
    environment: dict[str, str]
    directory: str
    uid: int | None
    gid: int | None


def resolve_program(settings: AgentTerminal) -> Program:
    """The program, user, environment and directory C{settings} name (checked by the config)."""
    entry = pwd.getpwnam(settings.user) if settings.user else pwd.getpwuid(os.getuid())
    if settings.command:
        executable = shutil.which(settings.command[0]) or settings.command[0]
        args = tuple(settings.command)
    else:
        executable = entry.pw_shell
        # A leading '-' in argv[0]: the shell's sign that it is a login shell.
        args = ("-" + os.path.basename(entry.pw_shell),)
    environment = {
        "TERM": settings.term,
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "SHELL": entry.pw_shell,
        "PATH": os.environ.get("PATH", _DEFAULT_PATH),
    }
    if "LANG" in os.environ:
        environment["LANG"] = os.environ["LANG"]
    environment.update(settings.environment)
    own = entry.pw_uid == os.getuid()
    return Program(
        executable=executable,
        args=args,
        environment=environment,
        directory=settings.working_directory or entry.pw_dir,
        uid=None if own else entry.pw_uid,
        gid=None if own else entry.pw_gid,
    )


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """Tell the PTY (and through SIGWINCH its foreground program) its size."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def session_members(sid: int) -> list[int]:
    """Processes of session C{sid} still alive (Linux /proc; none elsewhere)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # After the command's closing parenthesis: state, ppid, pgrp, session.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != b"Z":
            found.append(int(name))
    return found


def _head_size(headers: Headers) -> tuple[int, int]:
    size = {name: value for name, value in headers}
    try:
        rows = int(size.get(b"rows", b"24"))
        cols = int(size.get(b"cols", b"80"))
    except ValueError:
        return 24, 80
    return max(1, min(rows, 1000)), max(1, min(cols, 1000))


@implementer(IStreamReceiver)
class PTYSession(ProcessProtocol):
    """One terminal: a program on a PTY, carried by one stream."""

    log = Logger()

    def __init__(self, service: TerminalService, stream: IStream) -> None:
        self.service = service
        self.stream = stream
        self.allocation = stream.head.tunnel
        self.reader = RecordReader()
        self.pid: int | None = None
        self.master: int | None = None
        self.closing: tuple[str, str] | None = None  # (reason, message) once hanging up
        self.exited = False  # the child was reaped
        self.ended = False  # processEnded: reaped and the PTY closed
        self.stream_done = False
        self._deadline: Any = None
        self._silence: Any = None
        self._last_heard = service.reactor.seconds()
        self._waiters: list[Deferred[None]] = []

    # -- start ---------------------------------------------------------------

    def start(self) -> bool:
        """Spawn the program; False (the stream closed with spawn_failed) if it cannot start."""
        service = self.service
        program = service.program
        rows, cols = _head_size(self.stream.head.headers)
        master, slave = os.openpty()
        try:
            set_window_size(master, rows, cols)
            service.reactor.spawnProcess(
                self, program.executable, list(program.args), env=program.environment,
                path=program.directory, uid=program.uid, gid=program.gid,
                usePTY=(master, slave, os.ttyname(slave)),
            )
        except Exception as e:
            os.close(master)
            os.close(slave)
            self.log.warn(
                "terminal for {allocation}: cannot start {program}: {error}",
                allocation=self.allocation, program=program.executable, error=str(e),
            )
            self._send(Close("spawn_failed", f"cannot start {program.executable}: {e}"))
            self._end_stream()
            return False
        self.master = master
        self.stream.attach(self)
        transport: Any = self.transport
        self.stream.registerProducer(transport, True)  # no credit: stop reading the PTY
        # A full PTY stops granting credit; the PTY's end is not the stream's.
        transport.registerProducer(_CreditGate(self.stream), True)
        self._send(Ready(f"pid {self.pid}"))
        self._silence = service.reactor.callLater(service.settings.heartbeat_timeout, self._silent)
        self.log.info(
            "terminal for {allocation} started: {program} (pid {pid}, {rows}x{cols})",
            allocation=self.allocation, program=program.executable, pid=self.pid,
            rows=rows, cols=cols,
        )
        return True

    def connectionMade(self) -> None:  # noqa: N802
        self.pid = self.transport.pid  # type: ignore[union-attr]

    # -- the PTY -------------------------------------------------------------

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        if not self.stream_done:
            self.stream.write(encode_output(data))

    def processExited(self, reason: Failure) -> None:  # noqa: N802
        self.exited = True
        if self.closing is None:
            # Exited by itself: read what it wrote last (the PTY then reports
            # its end), unless nothing can take it; the deadline makes sure.
            self.closing = ("exited", _status(reason))
            self.transport.resumeProducing()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]
        self._arm_deadline()

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.ended = True
        self.exited = True
        self._cancel_timers()
        if self.pid is not None:
            for pid in session_members(self.pid):
                _kill(pid, signal.SIGKILL)
        why, message = self.closing or ("exited", _status(reason))
        if why == "exited":
            message = _status(reason)
            self._send(Close("exited", message))
        self._end_stream()
        self.service.sessions.discard(self)
        self.log.info(
            "terminal for {allocation} ended ({reason}: {message}); pid {pid} reaped",
            allocation=self.allocation, reason=why, message=message, pid=self.pid,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- the stream ----------------------------------------------------------

    def reply_received(self, reply: ReplyHead) -> None:
        """IStreamReceiver.reply_received: never on the agent side."""

    def data_received(self, data: bytes) -> None:
        """IStreamReceiver.data_received: records from the edge."""
        self._last_heard = self.service.reactor.seconds()
        try:
            records = self.reader.feed(bytes(data))
        except RecordError as e:
            self.log.warn("terminal for {allocation}: {error}", allocation=self.allocation,
                          error=str(e))
            self._send(Close("protocol_error", str(e)))
            self.hang_up("protocol_error", str(e))
            return
        for record in records:
            if self.closing is not None:
                return
            if isinstance(record, Output):
                self.transport.write(record.data)  # type: ignore[union-attr]
            elif isinstance(record, Resize):
                if self.master is not None and not self.ended:
                    try:
                        set_window_size(
                            self.master, max(1, min(record.rows, 1000)),
                            max(1, min(record.cols, 1000)),
                        )
                    except OSError:
                        pass  # the PTY is closing
            elif isinstance(record, Heartbeat):
                if not record.reply:
                    self._send(Heartbeat(record.opaque, reply=True))
            elif isinstance(record, Close):
                self.hang_up(record.reason, record.message)

    def end_received(self, trailers: Headers) -> None:
        """IStreamReceiver.end_received: the edge has nothing more to say (we end ours after the child)."""
        self.hang_up("browser_closed", "the edge ended the stream")

    def reset_received(self, reason: Reason, message: str) -> None:
        """IStreamReceiver.reset_received: the edge or the link gave up on the stream."""
        self.stream_done = True
        name = "agent_gone" if reason in (Reason.AGENT_GONE, Reason.DRAINING) else reason.value
        self.hang_up(name, message)

    # -- ending --------------------------------------------------------------

    def hang_up(self, reason: str, message: str) -> None:
        """End the terminal: SIGHUP to its program, SIGKILL after the grace."""
        if self.closing is not None and self.closing[0] != "exited":
            return
        if self.closing is None:
            self.closing = (reason, message)
        if self.ended:
            return
        self.log.info(
            "terminal for {allocation} hanging up ({reason}: {message})",
            allocation=self.allocation, reason=reason, message=message,
        )
        try:
            self.transport.signalProcess("HUP")  # type: ignore[union-attr]
        except (ProcessExitedAlready, OSError):
            pass
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None or not self._deadline.active():
            self._deadline = self.service.reactor.callLater(
                self.service.settings.close_grace, self._past_deadline
            )

    def _past_deadline(self) -> None:
        self._deadline = None
        if self.ended:
            return
        if not self.exited:
            self.log.warn(
                "terminal for {allocation}: pid {pid} outlived its hang-up; killing it",
                allocation=self.allocation, pid=self.pid,
            )
            if self.pid is not None:
                for pid in [self.pid, *session_members(self.pid)]:
                    _kill(pid, signal.SIGKILL)
        else:
            # Reaped, but the PTY was never seen to close (its reader paused
            # and its output untaken): close it now.
            transport: Any = self.transport
            transport.stopReading()
            transport.stopWriting()
            transport.connectionLost(Failure(ConnectionDone("terminal closed")))
            return
        self._arm_deadline()

    def _silent(self) -> None:
        self._silence = None
        timeout = self.service.settings.heartbeat_timeout
        quiet = self.service.reactor.seconds() - self._last_heard
        if quiet < timeout:
            self._silence = self.service.reactor.callLater(timeout - quiet, self._silent)
            return
        message = f"nothing from the edge for {quiet:.0f}s"
        self._send(Close("agent_silent", message))
        self.hang_up("agent_silent", message)

    def _cancel_timers(self) -> None:
        for name in ("_deadline", "_silence"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None and timer.active():
                timer.cancel()

    def _send(self, record: Close | Heartbeat | Ready) -> None:
        if not self.stream_done:
            self.stream.write(encode(record))

    def _end_stream(self) -> None:
        if not self.stream_done:
            self.stream_done = True
            self.stream.unregisterProducer()
            self.stream.end()

    def when_ended(self) -> Deferred[None]:
        if self.ended:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter


@implementer(IPushProducer)
class _CreditGate:
    """
    The stream as the PTY's producer: paused and resumed with the PTY's
    buffer, but a closing PTY does not stop it (the session ends the stream
    itself, after the last output and the exit status).
    """

    def __init__(self, stream: IStream) -> None:
        self.stream = stream

    def pauseProducing(self) -> None:  # noqa: N802
        self.stream.pauseProducing()

    def resumeProducing(self) -> None:  # noqa: N802
        self.stream.resumeProducing()

    def stopProducing(self) -> None:  # noqa: N802
        pass


def _status(reason: Failure) -> str:
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    if sig is not None:
        return f"killed by signal {sig}"
    return f"status {code if code is not None else '?'}"


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


@implementer(IUpstream)
class TerminalService:
    """The agent's terminals: one L{PTYSession} per terminal stream, bounded in number."""

    log = Logger()

    def __init__(self, reactor: Any, settings: AgentTerminal, agent_id: str) -> None:
        self.reactor = reactor
        self.settings = settings
        self.agent_id = agent_id
        self.program = resolve_program(settings)
        self.sessions: set[PTYSession] = set()

    def forward(self, stream: IStream) -> None:
        """Start a terminal for C{stream} (or close it saying why not)."""
        if stream.head.tunnel != self.agent_id:
            self._refuse(stream, "agent_identity",
                         f"this agent is {self.agent_id!r}, not {stream.head.tunnel!r}")
            return
        if len(self.sessions) >= self.settings.max_sessions:
            self._refuse(stream, "agent_busy",
                         f"{len(self.sessions)} terminals open (max_sessions)")
            return
        session = PTYSession(self, stream)
        if session.start():
            self.sessions.add(session)

    def _refuse(self, stream: IStream, reason: str, message: str) -> None:
        self.log.warn("terminal refused ({reason}: {message})", reason=reason, message=message)
        stream.write(encode(Close(reason, message)))
        stream.end()

    def close(self) -> Deferred[Any]:
        """The agent stops: hang up every terminal; fires once each child is reaped."""
        waits = []
        for session in list(self.sessions):
            waits.append(session.when_ended())
            session._send(Close("agent_stopping", "the agent is stopping"))
            session.hang_up("agent_stopping", "the agent is stopping")
        return DeferredList(waits)


@implementer(IUpstream)
class DisabledTerminal:
    """The terminal streams of an agent without a terminal service: each is told so."""

    def forward(self, stream: IStream) -> None:
        """L{IUpstream}: close the terminal saying why."""
        stream.write(encode(Close("terminal_disabled", "[agent.terminal] is not enabled here")))
        stream.end()

    def close(self) -> Deferred[Any]:
        """L{IUpstream}: nothing to close."""
        return succeed(None)
