"""
How many calls an agent may hold on the gRPC link, and what one idle call
costs: the edge's SETTINGS_MAX_CONCURRENT_STREAMS and the refusal at it.
"""

from __future__ import annotations

from h2.settings import SettingCodes
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.test_grpc_transport import Receiver, head, link_pair, until
from tunneld.interfaces import EdgeLinkSetup
from tunneld.reasons import Reason
from tunneld.transports.grpc import EdgeGrpcLink, GrpcTransport


class MaxConcurrentCallsTests(TestCase):
    """The edge's cap on an agent's calls."""

    def _advertised(self, table: dict[str, object], max_streams: int) -> int:
        options = GrpcTransport().edge_options(table, "(test)")
        link = EdgeGrpcLink(options, EdgeLinkSetup(on_link=print, reactor=reactor, max_streams=max_streams))
        return link.local_settings()[SettingCodes.MAX_CONCURRENT_STREAMS]

    def test_default_leaves_room_beyond_the_stream_cap(self) -> None:
        """By default the edge allows max_streams_per_agent calls plus room for Control and idle calls."""
        self.assertEqual(self._advertised({}, 10_000), 10_000 + 1024)
        self.assertEqual(self._advertised({}, 50), 50 + 1024)

    def test_a_set_value_is_used_as_is(self) -> None:
        """A configured max_concurrent_calls is what the edge advertises."""
        self.assertEqual(self._advertised({"max_concurrent_calls": 7}, 10_000), 7)

    async def test_a_stream_beyond_the_cap_is_refused_with_its_reason(self) -> None:
        """With every call the link allows busy, a new stream is refused as cap_reached, naming the setting."""
        pair = await link_pair(
            self,
            edge={"max_concurrent_calls": 3, "queued_open_timeout": 0.2},
            agent={"min_idle_forwards": 2},
        )
        await until(lambda: len(pair.edge.idle) == 2)
        held = [Receiver(), Receiver()]
        for receiver in held:
            pair.edge.open_stream(head("/hold"), receiver)
        await until(lambda: all(r.reply is not None for r in held))
        refused = Receiver()
        pair.edge.open_stream(head("/hold"), refused)
        await refused.done
        assert refused.reset is not None
        self.assertEqual(refused.reset[0], Reason.CAP_REACHED)
        self.assertIn("max_concurrent_calls", refused.reset[1])
        self.assertEqual([r.reset for r in held], [None, None])
        self.assertEqual(len(pair.agent_handler.streams), 2)
