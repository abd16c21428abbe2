"""The routing table: hostname and path matching, reservations, health and load spreading."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from twisted.internet.defer import succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tunneld.interfaces import IAgentLink, ILinkHandler, IStream, IStreamReceiver
from tunneld.model.keys import tunnel_key
from tunneld.model.messages import ControlMessage, StreamHead, TunnelSpec
from tunneld.model.reasons import Reason
from tunneld.router import AgentSession, Route, Router, hostname_allowed


@implementer(IAgentLink)
class FakeLink:
    """An agent link that only knows how many streams it carries."""

    transport_name = "fake"
    peer_certificate = None

    def __init__(self, name: str, streams: int = 0) -> None:
        self.peer = name
        self.streams = streams

    def set_handler(self, handler: ILinkHandler) -> None:
        raise NotImplementedError

    def send_control(self, message: ControlMessage) -> None:
        raise NotImplementedError

    def open_stream(
        self, head: StreamHead, receiver: IStreamReceiver, end_stream: bool = False
    ) -> IStream:
        raise NotImplementedError

    def round_trip_time(self) -> float | None:
        return None

    def active_streams(self) -> int:
        return self.streams

    def close(self, reason: Reason, message: str) -> None:
        raise NotImplementedError

    def when_closed(self) -> Any:
        return succeed(None)


def session(name: str, streams: int = 0) -> AgentSession:
    return AgentSession(session_id="s-" + name, agent_id=name, link=FakeLink(name, streams))


def agent_of(route: Route | Reason) -> str:
    assert isinstance(route, Route), route
    return route.session.agent_id


class MatchTests(SynchronousTestCase):
    """Which tunnel a hostname and path reach."""

    def setUp(self) -> None:
        self.router = Router(random.Random(1))

    def serve(self, name: str, hostname: str, prefix: str = "") -> AgentSession:
        s = session(name)
        self.router.register(s, TunnelSpec(hostname, path_prefix=prefix))
        return s

    def test_fake_link_provides_interface(self) -> None:
        """The fake link provides IAgentLink."""
        self.assertTrue(verifyObject(IAgentLink, FakeLink("x")))

    def test_exact_beats_wildcard(self) -> None:
        """An exact hostname wins over a wildcard covering it, whatever the registration order."""
        self.serve("wild", "*.a.test")
        self.serve("exact", "x.a.test")
        self.assertEqual(agent_of(self.router.route("x.a.test", "/")), "exact")
        self.assertEqual(agent_of(self.router.route("y.a.test", "/")), "wild")

    def test_longer_wildcard_beats_shorter(self) -> None:
        """*.x.a.test wins over *.a.test for names under x.a.test."""
        self.serve("short", "*.a.test")
        self.serve("long", "*.x.a.test")
        self.assertEqual(agent_of(self.router.route("y.x.a.test", "/")), "long")
        self.assertEqual(agent_of(self.router.route("y.z.a.test", "/")), "short")

    def test_wildcard_depth(self) -> None:
        """*.a.test matches x.a.test and y.x.a.test but not a.test itself nor xa.test."""
        self.serve("wild", "*.a.test")
        self.assertEqual(agent_of(self.router.route("x.a.test", "/")), "wild")
        self.assertEqual(agent_of(self.router.route("y.x.a.test", "/")), "wild")
        self.assertIs(self.router.route("a.test", "/"), Reason.NO_TUNNEL)
        self.assertIs(self.router.route("xa.test", "/"), Reason.NO_TUNNEL)

    def test_case_and_trailing_dot(self) -> None:
        """Hostnames match case-insensitively and with a trailing dot."""
        self.serve("exact", "Demo.A.Test")
        self.assertEqual(agent_of(self.router.route("DEMO.a.test.", "/")), "exact")

    def test_path_prefixes(self) -> None:
        """The longest matching prefix wins; /api matches /api, /api/x and /api?q but not /apix."""
        self.serve("root", "a.test")
        self.serve("api", "a.test", "/api")
        self.serve("v2", "a.test", "/api/v2")
        cases = {
            "/api": "api",
            "/api/x": "api",
            "/api?q=1": "api",
            "/apix": "root",
            "/api/v2": "v2",
            "/api/v2/users": "v2",
            "/api/v20": "api",
            "/": "root",
        }
        for path, expected in cases.items():
            self.assertEqual(agent_of(self.router.route("a.test", path)), expected, path)

    def test_prefix_without_match(self) -> None:
        """When only a path-prefixed tunnel exists, other paths get NO_TUNNEL."""
        self.serve("api", "a.test", "/api")
        self.assertIs(self.router.route("a.test", "/apix"), Reason.NO_TUNNEL)

    def test_no_match(self) -> None:
        """A hostname nobody serves gets NO_TUNNEL."""
        self.serve("exact", "a.test")
        self.assertIs(self.router.route("b.test", "/"), Reason.NO_TUNNEL)

    def test_route_names_the_tunnel(self) -> None:
        """The route carries the tunnel key and the chosen session's link."""
        s = self.serve("api", "a.test", "/api")
        route = self.router.route("a.test", "/api/x")
        assert isinstance(route, Route)
        self.assertEqual(route.tunnel, tunnel_key(TunnelSpec("a.test", "/api")))
        self.assertEqual(route.tunnel, "a.test/api")
        self.assertIs(route.link, s.link)


class AvailabilityTests(SynchronousTestCase):
    """Reserved names, unhealthy and draining sessions, and unregistering."""

    def setUp(self) -> None:
        self.router = Router(random.Random(2))

    def test_reserved_without_sessions(self) -> None:
        """A reserved hostname nobody serves gets AGENT_UNAVAILABLE; others NO_TUNNEL."""
        self.router.reserve("demo.a.test")
        self.router.reserve("*.w.test")
        self.assertIs(self.router.route("demo.a.test", "/"), Reason.AGENT_UNAVAILABLE)
        self.assertIs(self.router.route("x.w.test", "/"), Reason.AGENT_UNAVAILABLE)
        self.assertIs(self.router.route("w.test", "/"), Reason.NO_TUNNEL)
        self.assertIs(self.router.route("other.a.test", "/"), Reason.NO_TUNNEL)

    def test_unhealthy_and_draining_skipped(self) -> None:
        """Unhealthy or draining sessions are never chosen; with only those, AGENT_UNAVAILABLE."""
        spec = TunnelSpec("a.test")
        sick, draining, good = session("sick"), session("draining"), session("good")
        sick.healthy = False
        draining.draining = True
        for s in (sick, draining, good):
            self.router.register(s, spec)
        for _ in range(20):
            self.assertEqual(agent_of(self.router.route("a.test", "/")), "good")
        good.healthy = False
        self.assertIs(self.router.route("a.test", "/"), Reason.AGENT_UNAVAILABLE)

    def test_all_draining_is_draining(self) -> None:
        """Every session of a tunnel draining (its agents moving to another edge): DRAINING, which tells a client to retry."""
        spec = TunnelSpec("a.test")
        one, two = session("one"), session("two")
        for s in (one, two):
            self.router.register(s, spec)
            s.draining = True
        self.assertIs(self.router.route("a.test", "/"), Reason.DRAINING)
        two.draining = False
        two.healthy = False
        self.assertIs(self.router.route("a.test", "/"), Reason.AGENT_UNAVAILABLE)

    def test_unregister_removes_everything(self) -> None:
        """Unregistering a session removes it from every tunnel and drops emptied tunnels."""
        mine, other = session("mine"), session("other")
        for spec in (TunnelSpec("a.test"), TunnelSpec("a.test", "/api"), TunnelSpec("*.b.test")):
            self.router.register(mine, spec)
        self.router.register(other, TunnelSpec("a.test", "/api"))
        self.router.unregister(mine)
        self.assertEqual(self.router.snapshot(), {"a.test/api": ["other"]})
        self.assertIs(self.router.route("a.test", "/"), Reason.NO_TUNNEL)
        self.assertIs(self.router.route("x.b.test", "/"), Reason.NO_TUNNEL)
        self.assertEqual(agent_of(self.router.route("a.test", "/api")), "other")
        self.router.unregister(other)
        self.assertEqual(self.router.snapshot(), {})

    def test_routes_follow_changes_after_lookups(self) -> None:
        """A name already looked up sees tunnels that come and go afterwards (no stale lookup)."""
        self.assertIs(self.router.route("x.a.test", "/"), Reason.NO_TUNNEL)
        wild, exact = session("wild"), session("exact")
        self.router.register(wild, TunnelSpec("*.a.test"))
        self.assertEqual(agent_of(self.router.route("x.a.test", "/")), "wild")
        self.router.register(exact, TunnelSpec("x.a.test"))
        self.assertEqual(agent_of(self.router.route("x.a.test", "/")), "exact")
        self.router.unregister(exact)
        self.assertEqual(agent_of(self.router.route("x.a.test", "/")), "wild")
        self.router.unregister(wild)
        self.assertIs(self.router.route("x.a.test", "/"), Reason.NO_TUNNEL)

    def test_lookups_of_many_names_stay_bounded(self) -> None:
        """Looking up many distinct names (any Host a client sends) keeps a bounded memory of them."""
        self.router.register(session("wild"), TunnelSpec("*.a.test"))
        for i in range(10_000):
            self.assertEqual(agent_of(self.router.route(f"n{i}.a.test", "/")), "wild")
        self.assertLessEqual(len(self.router._candidate_cache), 4096)

    def test_register_twice(self) -> None:
        """Registering the same session and spec twice lists it once."""
        s = session("s")
        self.router.register(s, TunnelSpec("a.test"))
        self.router.register(s, TunnelSpec("a.test"))
        self.assertEqual(self.router.snapshot(), {"a.test": ["s"]})
        self.assertEqual(s.tunnels, [TunnelSpec("a.test")])


class LoadTests(SynchronousTestCase):
    """Among usable sessions the least loaded is chosen, ties at random."""

    def test_least_loaded(self) -> None:
        """The session with the fewest active streams is chosen every time."""
        router = Router(random.Random(3))
        for name, load in (("busy", 5), ("idle", 2), ("busier", 7)):
            router.register(session(name, load), TunnelSpec("a.test"))
        for _ in range(20):
            self.assertEqual(agent_of(router.route("a.test", "/")), "idle")

    def test_load_is_read_at_routing_time(self) -> None:
        """A session's load is read from its link when routing, not when registering."""
        router = Router(random.Random(4))
        first, second = session("first", 0), session("second", 1)
        router.register(first, TunnelSpec("a.test"))
        router.register(second, TunnelSpec("a.test"))
        self.assertEqual(agent_of(router.route("a.test", "/")), "first")
        first.link.streams = 3  # type: ignore[attr-defined]
        self.assertEqual(agent_of(router.route("a.test", "/")), "second")

    def test_ties_spread(self) -> None:
        """Equally loaded sessions all get a share of the routes (seeded, so deterministic)."""
        router = Router(random.Random(5))
        for name in ("a", "b", "c"):
            router.register(session(name, 1), TunnelSpec("a.test"))
        router.register(session("loaded", 4), TunnelSpec("a.test"))
        counts = Counter(agent_of(router.route("a.test", "/")) for _ in range(300))
        self.assertEqual(set(counts), {"a", "b", "c"})
        for name in ("a", "b", "c"):
            self.assertGreater(counts[name], 50, counts)


class HostnameAllowedTests(SynchronousTestCase):
    """Which hostnames a grant of patterns lets an agent register."""

    def test_exact(self) -> None:
        """An exact grant allows that name in any case, and nothing under it."""
        self.assertTrue(hostname_allowed("demo.a.test", ["demo.a.test"]))
        self.assertTrue(hostname_allowed("Demo.A.Test", ["demo.a.test"]))
        self.assertFalse(hostname_allowed("x.demo.a.test", ["demo.a.test"]))
        self.assertFalse(hostname_allowed("*.demo.a.test", ["demo.a.test"]))

    def test_wildcard(self) -> None:
        """*.a.test allows names and narrower wildcards under a.test, but not a.test or xa.test."""
        grant = ["*.a.test"]
        self.assertTrue(hostname_allowed("x.a.test", grant))
        self.assertTrue(hostname_allowed("y.x.a.test", grant))
        self.assertTrue(hostname_allowed("*.a.test", grant))
        self.assertTrue(hostname_allowed("*.x.a.test", grant))
        self.assertFalse(hostname_allowed("a.test", grant))
        self.assertFalse(hostname_allowed("xa.test", grant))
        self.assertFalse(hostname_allowed("x.b.test", grant))

    def test_any_of_several(self) -> None:
        """A name allowed by any one pattern of the grant is allowed; an empty grant allows nothing."""
        self.assertTrue(hostname_allowed("b.test", ["a.test", "b.test"]))
        self.assertFalse(hostname_allowed("c.test", ["a.test", "*.b.test"]))
        self.assertFalse(hostname_allowed("a.test", []))


class PortTests(SynchronousTestCase):
    """TCP tunnels: edge port → tunnel → session, kept apart from hostname routing."""

    def setUp(self) -> None:
        self.router = Router(random.Random(1))

    def serve(self, name: str, tunnel: str, port: int, streams: int = 0) -> AgentSession:
        s = session(name, streams)
        self.router.register_port(s, TunnelSpec(tunnel, protocol="tcp", port=port))
        return s

    def test_route_by_port(self) -> None:
        """A connection to a tunnel's port reaches a session serving it, named by the tunnel."""
        self.serve("a", "db", 10000)
        route = self.router.route_port(10000)
        self.assertEqual(agent_of(route), "a")
        assert isinstance(route, Route)
        self.assertEqual(route.tunnel, "db")
        self.assertEqual((self.router.port_of("db"), self.router.port_owner(10000)), (10000, "db"))

    def test_unknown_port(self) -> None:
        """A port no tunnel has is no_tunnel."""
        self.assertEqual(self.router.route_port(10001), Reason.NO_TUNNEL)

    def test_least_loaded(self) -> None:
        """Among the sessions serving a port, the least loaded is chosen."""
        self.serve("busy", "db", 10000, streams=5)
        self.serve("idle", "db", 10000, streams=1)
        self.assertEqual(agent_of(self.router.route_port(10000)), "idle")

    def test_unhealthy_is_unavailable(self) -> None:
        """A port whose only session is unhealthy is agent_unavailable."""
        s = self.serve("a", "db", 10000)
        s.healthy = False
        self.assertEqual(self.router.route_port(10000), Reason.AGENT_UNAVAILABLE)

    def test_port_keeps_one_name(self) -> None:
        """A port already serving one tunnel cannot be registered for another."""
        self.serve("a", "db", 10000)
        with self.assertRaises(ValueError):
            self.serve("b", "other", 10000)

    def test_unregister_frees_port_after_last(self) -> None:
        """The port and name are free only once the last session serving them is gone."""
        first = self.serve("a", "db", 10000)
        second = self.serve("b", "db", 10000)
        self.router.unregister(first)
        self.assertEqual(agent_of(self.router.route_port(10000)), "b")
        self.router.unregister(second)
        self.assertEqual(self.router.route_port(10000), Reason.NO_TUNNEL)
        self.assertIsNone(self.router.port_of("db"))
        self.assertEqual(self.router.port_snapshot(), {})

    def test_hostnames_unaffected(self) -> None:
        """A TCP tunnel named like a hostname does not answer HTTP for that host."""
        s = self.serve("a", "db.test", 10000)
        self.assertEqual(self.router.route("db.test", "/"), Reason.NO_TUNNEL)
        self.router.register(s, TunnelSpec("web.test"))
        self.router.unregister(s)
        self.assertEqual(self.router.snapshot(), {})
        self.assertEqual(self.router.port_snapshot(), {})
