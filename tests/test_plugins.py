"""
Transports are plugins: a drop-in found on sys.path carries the whole
end-to-end suite, a missing one fails start with its name, and a broken one
(failing to import, not providing the interface, a name taken) is an error
naming it, never skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.protocols.basic import Int32StringReceiver
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

import tunneld.plugins
from tests.end_to_end import EndToEndMixin
from tunneld.errors import InvalidTransport, MissingTransport
from tunneld.interfaces import ITransportPlugin
from tunneld.model.reasons import Reason
from tunneld.registry import available_transports, find_transport

HERE = os.path.dirname(os.path.abspath(__file__))
DROPIN = os.path.join(HERE, "dropin")
ROOT = os.path.dirname(HERE)


def use_test_plugins(case: TestCase) -> None:
    """Put the test drop-in directory on the plugin path for one test."""
    path = os.path.join(DROPIN, "tunneld", "plugins")
    tunneld.plugins.__path__.append(path)
    case.addCleanup(tunneld.plugins.__path__.remove, path)


class BuiltinPluginTests(TestCase):
    def test_builtin_transports_found(self) -> None:
        """The built-in websocket transport is found through twisted.plugin and verifies."""
        plugins = available_transports()
        self.assertIn("websocket", plugins)
        verifyObject(ITransportPlugin, plugins["websocket"])

    def test_websocket_loaded_on_use(self) -> None:
        """
        Finding the transports loads no Autobahn (a process with no websocket
        link never needs it); the websocket plugin's first use loads it, and
        it works as the transport's own object.
        """
        script = (
            "import sys\n"
            "from tunneld.registry import available_transports\n"
            "from tunneld.speedups import configure, summary\n"
            "plugins = available_transports(); configure({}); summary()\n"
            "print('autobahn' in sys.modules)\n"
            "options = plugins['websocket'].agent_options({'url': 'ws://edge.test:8443/link'}, 'agent.toml')\n"
            "print('autobahn' in sys.modules, options.url)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual(result.stdout.split("\n"), ["False", "True ws://edge.test:8443/link", ""], result.stderr)

    def test_missing_transport_named(self) -> None:
        """A transport named in config but not installed fails with its name."""
        with self.assertRaises(MissingTransport) as raised:
            find_transport("carrier-pigeon", "edge.toml", "edge.transports[0]")
        self.assertIn("carrier-pigeon", str(raised.exception))
        self.assertIn("edge.toml", str(raised.exception))

    def test_missing_transport_stops_twistd(self) -> None:
        """twistd refuses to start an edge whose config names a missing transport."""
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write('[edge]\ntransports = ["carrier-pigeon"]\n')
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "tunneld", "--config", config],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertIn("carrier-pigeon", output)
        self.assertIn("edge.transports[0]", output)

    def test_dropin_found_on_sys_path(self) -> None:
        """A plugin in another sys.path entry's tunneld/plugins is found with no code change."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, DROPIN]))
        result = subprocess.run(
            [sys.executable, "-c",
             "from tunneld.registry import available_transports;"
             "print(sorted(available_transports()))"],
            capture_output=True, text=True, cwd=HERE, env=env, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("'lpframes'", result.stdout)


# Modules written into a scratch tunneld/plugins directory by the tests below.
_BROKEN_AT_IMPORT = """
raise RuntimeError("this plugin cannot find its frobnicator")
"""

_NOT_A_TRANSPORT = """
from twisted.plugin import IPlugin
from zope.interface import implementer

from tunneld.interfaces import ITransportPlugin


@implementer(IPlugin, ITransportPlugin)
class HalfDone:
    name = "half-done"

    def edge_options(self, table, where):
        return None


half_done = HalfDone()
"""

_SECOND_WEBSOCKET = """
from tunneld.transports.websocket import WebSocketTransport

impostor = WebSocketTransport()
"""


def scratch_plugins(case: TestCase, **modules: str) -> str:
    """
    A tunneld/plugins directory holding C{modules} (name -> source), on the
    plugin path for one test, as a third party's drop-in would be.
    """
    root = os.path.abspath(case.mktemp())
    path = os.path.join(root, "tunneld", "plugins")
    os.makedirs(path)
    for name, source in modules.items():
        with open(os.path.join(path, name + ".py"), "w") as f:
            f.write(source)
    tunneld.plugins.__path__.append(path)
    case.addCleanup(tunneld.plugins.__path__.remove, path)
    for name in modules:
        case.addCleanup(sys.modules.pop, f"tunneld.plugins.{name}", None)
    return root


class InvalidPluginTests(TestCase):
    """A transport plugin that cannot be used stops the start, naming it."""

    def test_plugin_failing_at_import(self) -> None:
        """A plugin module that raises at import is named, with what it raised."""
        scratch_plugins(self, tunneld_test_broken=_BROKEN_AT_IMPORT)
        with self.assertRaises(InvalidTransport) as raised:
            available_transports()
        message = str(raised.exception)
        self.assertIn("tunneld.plugins.tunneld_test_broken", message)
        self.assertIn("cannot be imported", message)
        self.assertIn("RuntimeError: this plugin cannot find its frobnicator", message)

    def test_plugin_not_providing_the_interface(self) -> None:
        """A plugin claiming ITransportPlugin without its methods is named, with what is missing."""
        scratch_plugins(self, tunneld_test_half_done=_NOT_A_TRANSPORT)
        with self.assertRaises(InvalidTransport) as raised:
            find_transport("websocket", "edge.toml", "edge.transports[0]")
        message = str(raised.exception)
        self.assertIn("'half-done'", message)
        self.assertIn("does not provide ITransportPlugin", message)
        self.assertIn("agent_options", message)

    def test_two_plugins_of_one_name(self) -> None:
        """A second plugin called 'websocket' is an error naming both, not a silent pick."""
        scratch_plugins(self, tunneld_test_impostor=_SECOND_WEBSOCKET)
        with self.assertRaises(InvalidTransport) as raised:
            available_transports()
        self.assertIn("two transport plugins are called 'websocket'", str(raised.exception))

    def test_broken_plugin_stops_twistd(self) -> None:
        """twistd refuses to start an edge while a broken plugin is installed, in one line naming it."""
        root = scratch_plugins(self, tunneld_test_broken=_BROKEN_AT_IMPORT)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, root]))
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "tunneld"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=60,
        )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(result.stdout, "")
        self.assertIn(
            "tunneld: transport plugin module tunneld.plugins.tunneld_test_broken", result.stderr
        )
        self.assertNotIn("Traceback", result.stderr)


class _Garbage(Int32StringReceiver):
    def connectionMade(self) -> None:
        self.sendString(b"\xff\xff\xff garbage")

    def stringReceived(self, string: bytes) -> None:  # noqa: N802
        self.factory.received.append(string)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed.callback(None)


class DropInEndToEnd(EndToEndMixin, TestCase):
    """The whole end-to-end suite over a transport that tunneld does not ship."""

    transport = "lpframes"

    def setUp(self) -> None:
        use_test_plugins(self)

    def agent_table(self, address: Any) -> dict[str, Any]:
        return {"connect": f"tcp:host=127.0.0.1:port={address.port}"}

    async def send_malformed_frame(self, address: Any) -> None:
        factory = protocol.ClientFactory()
        factory.protocol = _Garbage
        factory.closed = defer.Deferred()
        factory.received = []
        await TCP4ClientEndpoint(reactor, "127.0.0.1", address.port).connect(factory)
        await factory.closed
        # The edge said why before hanging up: a GoAway naming protocol_error.
        from tunneld.wire import codec

        goaway = codec.control_from(codec.decode(factory.received[-1]))
        self.assertEqual(goaway.reason, Reason.PROTOCOL_ERROR)
