"""
Tests for L{tunneld.speedups.scheduling}: C{cpu_scheduling = "batch"} runs the daemon
under C{SCHED_BATCH} and puts the policy back at stop; "default" leaves it;
a wrong value fails at start naming the key.
"""

from __future__ import annotations

import os

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tunneld.config import load_agent_config, load_edge_config
from tunneld.errors import ConfigError
from tunneld.speedups.scheduling import CpuScheduling, check_policy


class CpuSchedulingTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not hasattr(os, "SCHED_BATCH"):
            raise self.skipTest("no SCHED_BATCH on this platform")
        before = (os.sched_getscheduler(0), os.sched_getparam(0))
        self.before = before[0]
        self.addCleanup(lambda: os.sched_setscheduler(0, *before))

    def test_batch_while_running(self) -> None:
        """'batch' switches this thread to SCHED_BATCH at start and back at stop."""
        service = CpuScheduling("batch")
        service.startService()
        self.assertEqual(os.sched_getscheduler(0), os.SCHED_BATCH)
        service.stopService()
        self.assertEqual(os.sched_getscheduler(0), self.before)

    def test_default_leaves_policy(self) -> None:
        """'default' keeps whatever policy the process was started with."""
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        service = CpuScheduling("default")
        service.startService()
        self.assertEqual(os.sched_getscheduler(0), os.SCHED_BATCH)
        service.stopService()
        self.assertEqual(os.sched_getscheduler(0), os.SCHED_BATCH)

    def test_refused_switch_is_logged(self) -> None:
        """A refused switch (a sandbox's seccomp) is a warning, and the daemon runs on."""

        def refuse(*args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        self.patch(os, "sched_setscheduler", refuse)
        service = CpuScheduling("batch")
        events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service.startService()
        service.stopService()
        self.assertEqual(os.sched_getscheduler(0), self.before)
        warnings = [e for e in events if e.get("log_namespace", "").startswith("tunneld.speedups.scheduling")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("Operation not permitted", str(warnings[0]["error"]))


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_keys(self) -> None:
        """[edge] and [agent] take cpu_scheduling; the default is 'default'."""
        edge = load_edge_config(self.write('[edge]\ncpu_scheduling = "batch"\n'))
        self.assertEqual(edge.edge.cpu_scheduling, "batch")
        self.assertEqual(load_edge_config(self.write("")).edge.cpu_scheduling, "default")
        agent = load_agent_config(self.write(
            '[agent]\nid = "a"\ncpu_scheduling = "batch"\n'
            '[[tunnels]]\nhostname = "a.localhost"\nupstream = "tcp:host=127.0.0.1:port=1"\n'
        ))
        self.assertEqual(agent.agent.cpu_scheduling, "batch")

    def test_wrong_value(self) -> None:
        """An unknown policy stops the start with the file, the key and the choices."""
        path = self.write('[edge]\ncpu_scheduling = "fifo"\n')
        error = self.assertRaises(ConfigError, load_edge_config, path)
        self.assertIn(path, str(error))
        self.assertIn("edge.cpu_scheduling", str(error))
        self.assertIn("'default', 'batch'", str(error))
        self.assertIn("'fifo'", str(error))

    def test_platform_without_batch(self) -> None:
        """Where SCHED_BATCH does not exist, 'batch' is a configuration error."""
        self.patch(os, "SCHED_BATCH", None)
        del os.SCHED_BATCH
        self.assertIn("SCHED_BATCH", check_policy("batch") or "")
        self.assertIsNone(check_policy("default"))
