# -*- test-case-name: tests.test_observe -*-
"""
Prometheus metrics for one edge.

Each edge gets its own L{CollectorRegistry} (never the process-wide default),
so several edges in one process, as in the tests, do not collide.  Nothing is
counted here: L{EdgeCollector} reads L{EdgeStats} and the live agent sessions
at scrape time, so the hot path pays nothing for Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tunneld.model.reasons import Reason
from tunneld.observe.stats import RTT_BUCKETS, EdgeStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The reasons that are policy hits, and the policy each one stands for.
_POLICY = {Reason.RATE_LIMITED.value: "rate_limit", Reason.CAP_REACHED.value: "cap"}


class EdgeCollector(Collector):
    """Turns an edge's counters and live sessions into metric families."""

    def __init__(
        self, stats: EdgeStats, sessions: Any, backends: Callable[[], dict[str, bool]],
        state_health: Callable[[], Any] = lambda: None,
    ) -> None:
        self.stats = stats
        self.sessions = sessions
        self.backends = backends
        self.state_health = state_health

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        responses = CounterMetricFamily(
            "tunneld_http_responses", "Public HTTP responses sent, by status code.", labels=["code"]
        )
        for code, count in sorted(stats.responses.items()):
            responses.add_metric([str(code)], count)
        yield responses

        moved = CounterMetricFamily(
            "tunneld_stream_bytes",
            "Body bytes relayed: in = client to agent, out = agent to client.",
            labels=["direction"],
        )
        moved.add_metric(["in"], stats.bytes_in)
        moved.add_metric(["out"], stats.bytes_out)
        yield moved

        yield CounterMetricFamily(
            "tunneld_streams_opened", "Streams opened towards agents.", value=stats.streams_opened
        )

        refusals = CounterMetricFamily(
            "tunneld_refusals",
            "Requests (kind=request) and agent registrations (kind=agent) refused, by reason.",
            labels=["kind", "reason"],
        )
        counts = dict(stats.refusals)
        for reason in Reason:
            counts.setdefault(("request", reason.value), 0)
        for (kind, reason_label), count in sorted(counts.items()):
            refusals.add_metric([kind, reason_label], count)
        yield refusals

        policy = CounterMetricFamily(
            "tunneld_policy_hits",
            "Requests refused by a rate limit or a connection cap.",
            labels=["policy"],
        )
        for reason_label, name in _POLICY.items():
            policy.add_metric([name], counts.get(("request", reason_label), 0))
        yield policy

        cuts = CounterMetricFamily(
            "tunneld_stream_cuts",
            "Streams reset after their reply had started, by reason.",
            labels=["reason"],
        )
        for reason_label, count in sorted(stats.cuts.items()):
            cuts.add_metric([reason_label], count)
        yield cuts

        live = list(self.sessions.sessions.values())
        by_transport: dict[str, int] = dict.fromkeys(stats.sessions_up, 0)
        streams = 0
        for session in live:
            name = session.link.transport_name
            by_transport[name] = by_transport.get(name, 0) + 1
            streams += session.link.active_streams()
        active = GaugeMetricFamily(
            "tunneld_agent_sessions", "Agent sessions connected now, by transport.",
            labels=["transport"],
        )
        for name, count in sorted(by_transport.items()):
            active.add_metric([name], count)
        yield active
        established = CounterMetricFamily(
            "tunneld_agent_sessions_established",
            "Agent sessions established since start, by transport.", labels=["transport"],
        )
        for name, count in sorted(stats.sessions_up.items()):
            established.add_metric([name], count)
        yield established
        yield GaugeMetricFamily(
            "tunneld_streams_active", "Streams open on agent links now.", value=streams
        )
        yield GaugeMetricFamily(
            "tunneld_tunnels", "Tunnels with at least one agent session.",
            value=len(self.sessions.router.snapshot()),
        )

        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*RTT_BUCKETS, float("inf")), stats.rtt_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            "tunneld_link_rtt_seconds",
            "Agent link heartbeat round-trip time, sampled per session.",
            buckets=buckets, sum_value=stats.rtt_sum,
        )

        health = GaugeMetricFamily(
            "tunneld_state_backend_up", "Whether the state backend is reachable (1) or not (0).",
            labels=["backend"],
        )
        for name, up in sorted(self.backends().items()):
            health.add_metric([name], 1 if up else 0)
        yield health

        state = self.state_health()
        if state is not None:
            yield CounterMetricFamily(
                "tunneld_state_outages",
                "Times the state store became unreachable since start (the edge then decides "
                "locally: degraded).",
                value=state.outages,
            )
            yield CounterMetricFamily(
                "tunneld_state_fallback_decisions",
                "Rate-limit decisions made with a local bucket because the state store was "
                "unreachable.",
                value=state.fallback_decisions,
            )


class EdgeMetrics:
    """One edge's registry and the text a scrape returns."""

    def __init__(
        self, stats: EdgeStats, sessions: Any,
        backends: Callable[[], dict[str, bool]] = lambda: {"memory": True},
        state_health: Callable[[], Any] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EdgeCollector(stats, sessions, backends, state_health))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
