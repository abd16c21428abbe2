"""
Tests for L{tunneld.speedups}: the switches, their start-up report, the
configuration table, each trick's capability check against a library that
changed, the fallbacks not tested with their trick's own module, and the
door itself (no private state of another library touched elsewhere).
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib
import os
import types
from typing import Any
from unittest import skipIf

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.end_to_end import EventCollector
from tests.switches import stand_in_tricks, switch_tricks, unavailable
from tunneld import speedups
from tunneld.config import EdgeConfig, SpeedupsSection, load_agent_config, load_edge_config
from tunneld.errors import ConfigError
from tunneld.speedups import gctune, heap, lean_h2, native_mask, tls_groups, websocket_takeover
from tunneld.speedups.service import Speedups
from tunneld.speedups.switches import ENVIRONMENT, Trick

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "tunneld")


def _fresh(module: Any) -> Trick:
    """A trick with C{module}'s check, not yet run (the module's own keeps its answer for the process)."""
    return Trick(module.TRICK.name, "", "", module._check)


class TrickTests(SynchronousTestCase):
    """One switch: the check runs once, a failed check keeps the trick off."""

    def test_check_runs_once(self) -> None:
        """However often the trick is switched or asked, its check runs once."""
        calls: list[int] = []
        trick = Trick("t", "", "", lambda: calls.append(1) or None)
        self.assertTrue(trick.switch(True))
        trick.switch(False)
        self.assertFalse(trick.active)
        self.assertTrue(trick.switch(True))
        self.assertEqual(calls, [1])

    def test_failed_check_keeps_it_off(self) -> None:
        """A check that names a difference, or raises, leaves the trick off whatever the switch says."""
        for check in (lambda: "h2 moved things", lambda: 1 // 0):
            trick = Trick("t", "", "", check)
            self.assertFalse(trick.switch(True))
            self.assertFalse(trick.active)
            self.assertIsNotNone(trick.problem)
        self.assertIn("ZeroDivisionError", trick.problem or "")

    def test_deferred_check_waits_for_first_use(self) -> None:
        """A deferred trick switched on is listed on without its check; its first use runs it, once."""
        calls: list[int] = []
        trick = Trick("t", "", "", lambda: calls.append(1) or None, deferred=True)
        self.assertTrue(trick.switch(True))
        self.assertTrue(trick.pending)
        self.assertEqual(calls, [])
        self.assertTrue(trick.active)
        self.assertFalse(trick.pending)
        trick.switch(False)
        self.assertFalse(trick.active)
        self.assertTrue(trick.switch(True))
        self.assertEqual(calls, [1])

    def test_deferred_check_failing_is_warned_at_first_use(self) -> None:
        """A deferred trick whose check fails at its first use is off from then on, and the log says why."""
        events = EventCollector(self)
        trick = Trick("t", "", "the public API", lambda: "it moved", deferred=True)
        self.assertTrue(trick.switch(True))
        self.assertFalse(trick.active)
        self.assertFalse(trick.active)
        self.assertFalse(trick.switch(True))
        lines = [formatEvent(e) for e in events.events if "speedups:" in formatEvent(e)]
        self.assertEqual(lines, ["speedups: t is off: it moved; using the public API instead"])

    def test_environment_decides_until_configured(self) -> None:
        """Before the service maker switches it, a trick is on unless TUNNELD_SPEEDUPS says off."""
        self.patch(os, "environ", {ENVIRONMENT: "off"})
        self.assertFalse(Trick("t", "", "", lambda: None).active)
        self.patch(os, "environ", {})
        self.assertTrue(Trick("t", "", "", lambda: None).active)


class ConfigureTests(SynchronousTestCase):
    """L{speedups.configure} switches every trick from the [speedups] table."""

    def setUp(self) -> None:
        stand_in_tricks(self)  # whatever the installed libraries allow
        switch_tricks(self, True)

    def test_names_are_the_configuration_keys(self) -> None:
        """Every trick has its key in [speedups], beside `enabled`, and nothing else is there."""
        keys = [field.name for field in dataclasses.fields(SpeedupsSection)]
        self.assertEqual(keys, ["enabled", *speedups.NAMES])
        self.assertEqual([t.name for t in speedups.tricks()], list(speedups.NAMES))

    def test_one_off(self) -> None:
        """A key set to false turns that trick off and leaves the others on."""
        speedups.configure({"lean_h2": False})
        self.assertEqual(
            {t.name: t.active for t in speedups.tricks()},
            {name: name != "lean_h2" for name in speedups.NAMES},
        )
        self.assertIn("lean_h2 off", speedups.summary())
        self.assertIn("bulkwrite on", speedups.summary())

    def test_all_off_and_back(self) -> None:
        """enabled = false turns every trick off; configure returns the states it changed, which it takes back."""
        before = speedups.configure({"enabled": False})
        self.assertFalse(any(t.active for t in speedups.tricks()))
        self.assertEqual(before, dict.fromkeys(speedups.NAMES, True))
        speedups.configure(before)
        self.assertTrue(all(t.active for t in speedups.tricks()))

    def test_environment_overrides_the_file(self) -> None:
        """TUNNELD_SPEEDUPS=off turns every trick off even when the table turns them on."""
        self.patch(os, "environ", {**os.environ, ENVIRONMENT: "off"})
        speedups.configure({"enabled": True})
        self.assertFalse(any(t.active for t in speedups.tricks()))

    def test_configuration_table(self) -> None:
        """[speedups] reads from both files; a wrong type names the key."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[speedups]\nlean_h2 = false\n")
        self.assertFalse(load_edge_config(path).speedups.lean_h2)
        self.assertTrue(load_edge_config(path).speedups.bulkwrite)
        self.assertFalse(load_agent_config(path).speedups.lean_h2)
        self.assertEqual(EdgeConfig().speedups, SpeedupsSection())
        with open(path, "w") as f:
            f.write("[speedups]\nheap = 'yes'\n")
        with self.assertRaises(ConfigError) as raised:
            load_edge_config(path)
        self.assertIn("speedups.heap", str(raised.exception))


class StartupReportTests(SynchronousTestCase):
    """The Speedups service says at start which tricks are on, and why one is not."""

    def setUp(self) -> None:
        stand_in_tricks(self)  # whatever the installed libraries allow
        switch_tricks(self, True)
        self.patch(heap, "keep_large_buffers", lambda: False)  # not on the test process
        self.events = EventCollector(self)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events.events if "speedups:" in formatEvent(e)]

    def test_one_line_lists_every_trick(self) -> None:
        """Started, it logs one line naming each trick with on or off, as configured."""
        service = Speedups({"websocket_takeover": False})
        service.startService()
        self.addCleanup(service.stopService)
        [line] = self.lines()
        self.assertEqual(
            line,
            "speedups: " + ", ".join(
                f"{name} {'off' if name == 'websocket_takeover' else 'on'}" for name in speedups.NAMES
            ),
        )

    def test_failed_check_is_warned_once(self) -> None:
        """A trick wanted on whose check fails is warned about (what differs, the fallback), then listed off."""
        broken = Trick("lean_h2", "", "h2's public API", lambda: "h2's H2Stream lacks _inbound_window_manager")
        self.patch(lean_h2, "TRICK", broken)
        service = Speedups({})
        service.startService()
        self.addCleanup(service.stopService)
        warning, summary = self.lines()
        self.assertEqual(
            warning,
            "speedups: lean_h2 is off: h2's H2Stream lacks _inbound_window_manager; "
            "using h2's public API instead",
        )
        self.assertIn("lean_h2 off", summary)

    def test_switched_off_is_not_a_warning(self) -> None:
        """A trick the file turns off is not warned about, even if its check would fail."""
        self.patch(lean_h2, "TRICK", Trick("lean_h2", "", "", lambda: "changed"))
        Speedups({"enabled": False}).startService()
        [line] = self.lines()
        self.assertEqual(line, "speedups: " + ", ".join(f"{name} off" for name in speedups.NAMES))

    def test_environment_said_off(self) -> None:
        """With TUNNELD_SPEEDUPS=off the log says so before listing every trick off."""
        self.patch(os, "environ", {**os.environ, ENVIRONMENT: "off"})
        Speedups({}).startService()
        said, summary = self.lines()
        self.assertEqual(said, f"speedups: every trick off ({ENVIRONMENT} says off)")
        self.assertNotIn(" on", summary)


class CapabilityCheckTests(SynchronousTestCase):
    """Each check passes on the installed library and fails, naming why, on one that changed."""

    def test_checks_on_the_installed_libraries(self) -> None:
        """
        Exactly the tricks that the test command expects to fall back with the
        libraries installed (TUNNELD_TRICKS_OFF_HERE: none with the newest
        allowed versions, some with the lowest) fail their checks.
        """
        expected = {name for name in os.environ.get("TUNNELD_TRICKS_OFF_HERE", "").split(",") if name}
        problems = {name: _fresh(importlib.import_module(module)).problem for name, module in speedups.MODULES.items()}
        self.assertEqual({name for name, problem in problems.items() if problem is not None}, expected, problems)

    @skipIf(unavailable("lean_h2"), unavailable("lean_h2"))
    def test_lean_h2_missing_name(self) -> None:
        """An h2 whose stream lacks a private name fails the check, which names it."""
        names = {**lean_h2._PRIVATE, "H2Stream": (*lean_h2._PRIVATE["H2Stream"], "_no_such_window")}
        self.patch(lean_h2, "_PRIVATE", names)
        self.assertEqual(_fresh(lean_h2).problem, "h2's H2Stream lacks _no_such_window")

    @skipIf(unavailable("lean_h2"), unavailable("lean_h2"))
    def test_lean_h2_different_behaviour(self) -> None:
        """An h2 whose window bookkeeping no longer matches the lean connection's fails the check."""
        self.patch(lean_h2.LeanH2Connection, "_took", lambda self, stream, length: None)
        self.assertIn("disagree", _fresh(lean_h2).problem or "")

    def test_native_mask_missing(self) -> None:
        """Without Autobahn's compiled masker, or with one lacking a call, the check says so."""
        self.patch(native_mask, "_nvx", None)
        self.assertIn("not installed", _fresh(native_mask).problem or "")
        self.patch(native_mask, "_nvx", types.SimpleNamespace(lib=object(), ffi=object()))
        self.assertIn("nvx_xormask_new", _fresh(native_mask).problem or "")

    @skipIf(unavailable("tls_groups"), unavailable("tls_groups"))
    def test_tls_groups_missing(self) -> None:
        """A pyOpenSSL binding without SSL_CTX_set1_curves_list fails the check."""
        self.patch(tls_groups, "_setter", lambda: None)
        self.assertIn("SSL_CTX_set1_curves_list", _fresh(tls_groups).problem or "")

    @skipIf(unavailable("websocket_takeover"), unavailable("websocket_takeover"))
    def test_websocket_takeover_reads_before_open(self) -> None:
        """An Autobahn that parses what followed the handshake before onOpen fails the check."""
        from autobahn.twisted.websocket import WebSocketAdapterProtocol

        opened = WebSocketAdapterProtocol._onOpen

        def parse_first(self: Any) -> None:
            self.consumeData()
            opened(self)

        self.patch(WebSocketAdapterProtocol, "_onOpen", parse_first)
        self.assertIn("in its buffer at onOpen", _fresh(websocket_takeover).problem or "")

    def test_heap_elsewhere(self) -> None:
        """Not on glibc, the heap trick is off and says which C library it found."""
        self.patch(heap.platform, "libc_ver", lambda: ("musl", "1.2"))
        self.assertEqual(_fresh(heap).problem, "the C library is musl")

    def test_gc_without_freeze(self) -> None:
        """A Python without gc.freeze turns gc_freeze off."""
        self.patch(gctune, "gc", types.SimpleNamespace())
        self.assertIn("freeze", _fresh(gctune).problem or "")


class FallbackTests(SynchronousTestCase):
    """The fallbacks of the tricks whose own modules' tests do not cover them."""

    def test_heap_off_calls_nothing(self) -> None:
        """With heap off, keep_large_buffers leaves glibc alone."""
        switch_tricks(self, False, "heap")
        self.patch(heap, "_mallopt", lambda: self.fail("mallopt called"))
        self.assertFalse(heap.keep_large_buffers())

    def test_tls_groups_off_offers_one_curve(self) -> None:
        """
        With tls_groups off, a context offers the list's first elliptic curve
        only: a client that offers P-256 gets through, one that offers only
        X25519 (or only P-384) does not.  (With it on, both get through.)
        """
        if unavailable("tls_groups") is None:
            switch_tricks(self, True, "tls_groups")
            self.assertTrue(_handshake("prime256v1", "X25519:prime256v1:secp384r1"))
            self.assertTrue(_handshake("X25519", "X25519:prime256v1:secp384r1"))
        switch_tricks(self, False, "tls_groups")
        self.assertTrue(_handshake("prime256v1", "X25519:prime256v1:secp384r1"))
        self.assertFalse(_handshake("secp384r1", "X25519:prime256v1:secp384r1"))
        with self.assertRaises(ValueError):
            tls_groups.restrict_groups(SSL.Context(SSL.TLS_METHOD), "X25519")


def _self_signed() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "speedups.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return key, certificate


_KEY, _CERTIFICATE = _self_signed()


def _handshake(client_groups: str, server_groups: str) -> bool:
    """
    Whether an in-memory TLS 1.3 handshake succeeds between a client and a
    server restricted to C{client_groups} and C{server_groups} by
    L{tls_groups.restrict_groups} (with the trick as it is switched).
    """
    server_context = SSL.Context(SSL.TLS_METHOD)
    server_context.use_privatekey(crypto.PKey.from_cryptography_key(_KEY))
    server_context.use_certificate(crypto.X509.from_cryptography(_CERTIFICATE))
    tls_groups.restrict_groups(server_context, server_groups)
    client_context = SSL.Context(SSL.TLS_METHOD)
    client_context.set_min_proto_version(SSL.TLS1_3_VERSION)
    tls_groups.restrict_groups(client_context, client_groups)
    server, client = SSL.Connection(server_context), SSL.Connection(client_context)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return False
            try:
                data = one.bio_read(65536)
            except SSL.WantReadError:
                continue
            other.bio_write(data)
    try:
        client.do_handshake()
        server.do_handshake()
    except SSL.Error:
        return False
    return True


# The private state the tricks reach into, by the names the code uses (the
# shared/hooks check greps for the first five).
_PRIVATE_NAMES = {
    "_tempDataBuffer", "_tempDataLen", "_nvx_xormasker", "OpenSSL._util", "closeHandshakeTimeoutCall",
    "_writeDisconnecting", "_writeDisconnected", "_maybePauseProducer", "SEND_LIMIT", "bufferSize",
    "_inbound_flow_control_window_manager", "_inbound_window_manager", "_data_to_send",
    "_actual_content_length", "_expected_content_length", "_body_repr", "_receive_frame",
    "_terminate_connection", "_headers_buffer", "_preamble_len", "LeanH2Connection",
}


def _names_used(tree: ast.AST) -> list[tuple[int, str]]:
    """The attribute, variable and module names a module's code uses (not its strings or comments)."""
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            used.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name):
            used.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom):
            used += [(node.lineno, node.module or "")] + [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            used += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in _PRIVATE_NAMES:
            used.append((node.lineno, node.value))  # getattr(x, "name"), importlib
    return used


class DoorTests(SynchronousTestCase):
    """Every touch of another library's private state is behind the one door."""

    def test_private_state_only_in_speedups(self) -> None:
        """No module outside tunneld/speedups names the private state the tricks use."""
        found = []
        for folder, _, files in os.walk(PACKAGE):
            if os.path.relpath(folder, PACKAGE).split(os.sep)[0] == "speedups":
                continue
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        tree = ast.parse(f.read())
                    found += [
                        f"{os.path.relpath(path, ROOT)}:{line}: {used}"
                        for line, used in _names_used(tree) if used in _PRIVATE_NAMES
                    ]
        self.assertEqual(found, [])
        # And the check sees them where they are.
        with open(os.path.join(PACKAGE, "speedups", "bulkwrite.py")) as f:
            self.assertIn("_tempDataBuffer", {used for _, used in _names_used(ast.parse(f.read()))})

    def test_speedups_imports_nothing_of_tunneld(self) -> None:
        """tunneld.speedups imports only itself of tunneld's modules (import-linter checks the same for the tree)."""
        folder = os.path.join(PACKAGE, "speedups")
        imported = []
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                modules = (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                )
                imported += [
                    f"{name}: {module}" for module in modules
                    if module.split(".")[0] == "tunneld" and not module.startswith("tunneld.speedups")
                ]
        self.assertEqual(imported, [])


_CONTAINERS = {"dict", "set", "list", "Bounded", "ByIdentity", "OrderedDict", "defaultdict", "WeakKeyDictionary"}


def _module_state(tree: ast.Module) -> list[tuple[int, str]]:
    """Module-level names bound to an empty container or a cache (what a module would fill at run time)."""
    found = []
    for node in tree.body:
        targets: list[ast.expr] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        empty = (
            isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", getattr(value, "elts", None))
        ) or (isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", "")) in _CONTAINERS)
        if empty:
            found += [(node.lineno, ast.unparse(target)) for target in targets if ast.unparse(target) != "__all__"]
    return found


class ModuleStateTests(SynchronousTestCase):
    """Caches are state of the objects whose work they remember, never of a module."""

    def test_no_module_level_caches(self) -> None:
        """No tunneld module binds a name to an empty container or a cache table at import."""
        found = []
        for folder, _, files in os.walk(PACKAGE):
            for name in files:
                if name.endswith(".py") and not name.endswith("_pb2.py"):
                    path = os.path.join(folder, name)
                    with open(path) as f:
                        tree = ast.parse(f.read())
                    found += [f"{os.path.relpath(path, ROOT)}:{line}: {target}" for line, target in _module_state(tree)]
                    found += [
                        f"{os.path.relpath(path, ROOT)}:{node.lineno}: global {', '.join(node.names)}"
                        for node in ast.walk(tree) if isinstance(node, ast.Global)
                    ]
        # The exit status a stopping process leaves for its last moment (tunneld.exitstatus).
        self.assertEqual([f for f in found if "exitstatus.py" not in f], [])
        self.assertEqual(_module_state(ast.parse("_CACHE: dict[str, str] = {}\nKEEP = ByIdentity(4)\n")),
                         [(1, "_CACHE"), (2, "KEEP")])
