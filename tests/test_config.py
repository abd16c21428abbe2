"""Configuration: defaults, the shipped files, and errors that name file, key and reason."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tunneld.config import load_agent_config, load_edge_config, transport_options
from tunneld.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class ConfigTests(TestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def assert_error(self, text: str, key: str, reason: str, agent: bool = False) -> None:
        path = self.write(text)
        load = load_agent_config if agent else load_edge_config
        with self.assertRaises(ConfigError) as raised:
            config = load(path)
            section = config.agent if agent else config.edge  # type: ignore[union-attr]
            transport_options(
                section.transports, config.transports, config.source, edge=not agent
            )
        message = str(raised.exception)
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertIn(key, message)
        self.assertIn(reason, message)

    def test_no_file_is_loopback_defaults(self) -> None:
        """Without a file the edge listens on loopback only."""
        config = load_edge_config(None)
        self.assertEqual(config.edge.public_listen, ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(config.agents, [])

    def test_shipped_files_are_valid(self) -> None:
        """etc/tunneld.toml and etc/agent.toml load, transports included."""
        edge = load_edge_config(os.path.join(ROOT, "etc", "tunneld.toml"))
        transport_options(edge.edge.transports, edge.transports, edge.source, edge=True)
        agent = load_agent_config(os.path.join(ROOT, "etc", "agent.toml"))
        transport_options(agent.agent.transports, agent.transports, agent.source, edge=False)
        self.assertEqual(agent.tunnels[0].hostname, "demo.localhost")

    def test_unknown_key(self) -> None:
        """An unknown key is named, with the keys that are known there."""
        self.assert_error("[edge]\npublic_lisen = []\n", "edge.public_lisen", "unknown key")

    def test_unknown_section(self) -> None:
        """An unknown top-level table is named."""
        self.assert_error("[egde]\n", "egde", "unknown key")

    def test_wrong_type(self) -> None:
        """A value of the wrong type is named with what was expected."""
        self.assert_error('[edge]\nidle_timeout = "soon"\n', "edge.idle_timeout", "expected a number")

    def test_wrong_list_item(self) -> None:
        """A bad list item is named by its index."""
        self.assert_error("[edge]\npublic_listen = [8080]\n", "edge.public_listen[0]", "expected a string")

    def test_bad_value(self) -> None:
        """A value out of range says why."""
        self.assert_error("[edge]\nheader_timeout = 0\n", "edge.header_timeout", "greater than 0")

    def test_transport_option(self) -> None:
        """A transport's own options are validated with the same care."""
        self.assert_error("[transports.websocket]\nlisen = 1\n", "transports.websocket.lisen", "unknown key")

    def test_agent_bad_url(self) -> None:
        """An agent's malformed edge URL is refused."""
        self.assert_error(
            '[transports.websocket]\nurl = "http://x"\n', "transports.websocket.url", "ws://", agent=True
        )

    def test_missing_required(self) -> None:
        """A tunnel without an upstream is refused."""
        self.assert_error(
            '[[tunnels]]\nhostname = "a.test"\n', "tunnels[0].upstream", "required", agent=True
        )

    def test_bad_hostname(self) -> None:
        """A tunnel hostname that is not a hostname is refused."""
        self.assert_error(
            '[[tunnels]]\nhostname = "a b"\nupstream = "tcp:host=x:port=1"\n',
            "tunnels[0].hostname", "not a hostname", agent=True,
        )

    def test_tcp_tunnel(self) -> None:
        """A tcp tunnel reads with its protocol and remote port; http is the default."""
        path = self.write(
            '[[tunnels]]\nhostname = "web.test"\nupstream = "tcp:host=x:port=1"\n'
            '[[tunnels]]\nhostname = "db"\nupstream = "tcp:host=x:port=5432"\n'
            'protocol = "tcp"\nremote_port = 10005\n'
        )
        web, db = load_agent_config(path).tunnels
        self.assertEqual((web.protocol, web.remote_port), ("http", 0))
        self.assertEqual((db.protocol, db.remote_port), ("tcp", 10005))

    def test_bad_tcp_tunnels(self) -> None:
        """Wrong protocols, ports and tcp/http mixes are refused with the key that is wrong."""
        tunnel = '[[tunnels]]\nhostname = "db"\nupstream = "tcp:host=x:port=1"\n'
        cases = [
            ('protocol = "udp"\n', "tunnels[0].protocol", "'http' or 'tcp'"),
            ('protocol = "tcp"\nremote_port = 70000\n', "tunnels[0].remote_port", "must be a port"),
            ('protocol = "tcp"\npath_prefix = "/x"\n', "tunnels[0].path_prefix", "no path prefix"),
            ("remote_port = 10000\n", "tunnels[0].remote_port", "only tcp tunnels"),
        ]
        for extra, key, reason in cases:
            self.assert_error(tunnel + extra, key, reason, agent=True)

    def test_bad_tcp_ports(self) -> None:
        """A malformed tcp_ports range is refused, naming the bad part."""
        self.assert_error('[edge]\ntcp_ports = "10100-10000"\n', "edge.tcp_ports", "'10100-10000'")

    def test_syntax_error(self) -> None:
        """A file that is not TOML says so."""
        self.assert_error("[edge\n", "(syntax)", "not valid TOML")

    def test_missing_file(self) -> None:
        """A missing file is named."""
        with self.assertRaises(ConfigError) as raised:
            load_edge_config("/nonexistent/tunneld.toml")
        self.assertEqual(str(raised.exception), "/nonexistent/tunneld.toml: (file): no such file")

    def test_twistd_refuses_bad_config(self) -> None:
        """twistd exits non-zero before listening, printing file, key and reason."""
        cases = [
            ("[edge]\nbogus = 1\n", "edge.bogus: unknown key"),
            ('[edge]\nidle_timeout = "x"\n', "edge.idle_timeout: expected a number"),
        ]
        for text, expected in cases:
            path = self.write(text)
            result = subprocess.run(
                [*TWISTD, "-n", "--pidfile=", "tunneld", "--config", path],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(f"{path}: {expected}", result.stdout + result.stderr)
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "tunneld", "--config", "/nonexistent.toml"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/nonexistent.toml: (file): no such file", result.stdout + result.stderr)
