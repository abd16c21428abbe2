"""
The README's "Running it yourself" commands, run as written, side by side
from one directory: the edge and the agent both come up and carry a
request (twistd's default pid file would stop the second one).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile

from twisted.trial.unittest import TestCase

from tests.harness import TunnelHarness, listen_upstream
from tests.test_processes import ROOT, ProcessTests, spawn


def readme_commands() -> list[list[str]]:
    """The shell lines of the first code block under "## Running it yourself"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## Running it yourself", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None, "no sh block under 'Running it yourself'"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]


class ReadmeCommandTests(TestCase):
    timeout = 120

    shipped = ProcessTests.shipped

    async def test_edge_and_agent_side_by_side(self) -> None:
        """Both README commands run at once from one directory, write no twistd.pid, and serve."""
        edge_line, agent_line = readme_commands()
        self.assertIn("etc/tunneld.toml", edge_line)
        self.assertIn("etc/agent.toml", agent_line)
        edge_config = self.shipped("tunneld.toml", {
            'public_listen = ["tcp:8080:interface=127.0.0.1"]':
                'public_listen = ["tcp:0:interface=127.0.0.1"]',
            'listen = "tcp:8081:interface=127.0.0.1"': 'listen = "tcp:0:interface=127.0.0.1"',
            'admin_listen = "tcp:8090:interface=127.0.0.1"':
                'admin_listen = "tcp:0:interface=127.0.0.1"',
        })
        cwd = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, cwd)
        venv_bin = os.path.dirname(sys.executable)

        def as_run(line: list[str], config: str, name: str) -> list[str]:
            self.assertTrue(line[0].startswith(".venv/bin/"), line)
            program = os.path.join(venv_bin, line[0].removeprefix(".venv/bin/"))
            return [program, *[config if arg == name else arg for arg in line[1:]]]

        edge = spawn(self, as_run(edge_line, edge_config, "etc/tunneld.toml"), path=cwd)
        public = await edge.wait_for(r"public HTTP listening on 127\.0\.0\.1:(\d+)")
        link = await edge.wait_for(r"websocket agent link listening on 127\.0\.0\.1:(\d+)")
        upstream_port, _ = await listen_upstream(self)
        agent_config = self.shipped("agent.toml", {
            'url = "ws://127.0.0.1:8081/tunnel"': f'url = "ws://127.0.0.1:{link.group(1)}/tunnel"',
            'upstream = "tcp:host=127.0.0.1:port=8000"':
                f'upstream = "tcp:host=127.0.0.1:port={upstream_port}"',
        })
        agent = spawn(self, as_run(agent_line, agent_config, "etc/agent.toml"), path=cwd)
        await agent.wait_for(r"tunnel ready: http://demo\.localhost:8080/")
        harness = TunnelHarness(self, "websocket", {})
        port = int(public.group(1))
        harness.url = lambda path: f"http://127.0.0.1:{port}{path}".encode()  # type: ignore[method-assign]
        code, _, body = await harness.request("demo.localhost", "/hello")
        self.assertEqual((code, body), (200, b"hello from upstream"))
        self.assertFalse(edge.ended.called or agent.ended.called)
        self.assertEqual(os.listdir(cwd), [])
