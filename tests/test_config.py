"""Configuration: defaults, the shipped files, and errors that name file, key and reason."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from tunneld.config import load_agent_config, load_edge_config
from tunneld.errors import ConfigError
from tunneld.tap import load_agent, load_edge

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
        load = load_agent if agent else load_edge
        with self.assertRaises(ConfigError) as raised:
            load(path)  # as the service makers do: the schema, then plugins and certificates
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
        load_edge(os.path.join(ROOT, "etc", "tunneld.toml"))
        agent, _ = load_agent(os.path.join(ROOT, "etc", "agent.toml"))
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

    def test_agent_bad_proxy(self) -> None:
        """A forward proxy that is not http://host:port is refused, saying what it must be."""
        for value, problem in (
            ("https://proxy:3128", "a forward proxy is http://host:port"),
            ("http://proxy:3128/path", "nothing more"),
            ("http://proxy:99999", "not a proxy URL"),
        ):
            self.assert_error(f'[agent]\nproxy = "{value}"\n', "agent.proxy", problem, agent=True)

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

    def test_bad_listen_endpoints(self) -> None:
        """Every listener's endpoint string is parsed when the file is read: type, port, parameters."""
        cases = [
            ('[edge]\npublic_listen = ["tcp:0", "tpc:8080"]\n', "edge.public_listen[1]",
             "unknown endpoint type 'tpc' in 'tpc:8080'"),
            ('[edge]\npublic_h2c_listen = ["tcp:http"]\n', "edge.public_h2c_listen[0]",
             "not a valid tcp: endpoint: 'http' is not a number"),
            ('[edge]\npublic_tls_listen = ["tcp:8443:interfce=::1"]\n',
             "edge.public_tls_listen[0]", "unknown parameter 'interfce'"),
            ('[edge]\nadmin_listen = "localhost:8090"\n', "edge.admin_listen",
             "unknown endpoint type 'localhost'"),
            ('[edge]\nhealth_listen = "8082"\n', "edge.health_listen", "unknown endpoint type '8082'"),
            ('[edge]\npublic_listen = ["systemd:domain=INET4:index=0"]\n', "edge.public_listen[0]",
             "domain= must be one of INET, INET6, UNIX, got 'INET4'"),
            ('[edge]\npublic_listen = ["systemd:domain=INET"]\n', "edge.public_listen[0]",
             "exactly one of index="),
            ('[transports.websocket]\nlisten = "tpc:8081"\n', "transports.websocket.listen",
             "unknown endpoint type 'tpc'"),
            ('[edge]\ntransports = ["grpc"]\n[transports.grpc]\nlisten = "tcp:x"\n',
             "transports.grpc.listen", "'x' is not a number"),
        ]
        for text, key, reason in cases:
            self.assert_error(text, f"{key}: ", reason)

    def test_good_listen_endpoints(self) -> None:
        """Endpoint strings of every built-in type pass (a systemd: one without its socket too)."""
        path = self.write(
            '[edge]\npublic_listen = ["tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\\\:\\\\:1", '
            '"unix:/run/tunneld/public.sock", "systemd:domain=INET6:index=0", '
            '"systemd:domain=INET:name=tunneld.socket"]\nadmin_listen = ""\n'
        )
        self.assertEqual(len(load_edge_config(path).edge.public_listen), 5)

    def test_bad_upstream_endpoint(self) -> None:
        """An agent tunnel's upstream is parsed as a client endpoint when the file is read."""
        tunnel = '[[tunnels]]\nhostname = "a.test"\n'
        cases = [
            ('upstream = "tpc:8000"\n', "unknown endpoint type 'tpc' in 'tpc:8000'"),
            ('upstream = "tcp:8000"\n', "not a valid tcp: endpoint: missing port="),
            ('upstream = "tcp:host=127.0.0.1:port=80:tiemout=3"\n', "unknown parameter 'tiemout'"),
        ]
        for extra, reason in cases:
            self.assert_error(tunnel + extra, "tunnels[0].upstream: ", reason, agent=True)

    def run_twistd(self, plugin: str, path: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TWISTD, "-n", "--pidfile=", plugin, "--config", path],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )

    def test_twistd_refuses_bad_config(self) -> None:
        """twistd exits 1 before listening with one line: the file, key and reason, no usage text."""
        cases = [
            ("[edge]\nbogus = 1\n", "edge.bogus: unknown key"),
            ('[edge]\nidle_timeout = "x"\n', "edge.idle_timeout: expected a number"),
            ('[edge]\npublic_listen = ["tpc:8080"]\n',
             "edge.public_listen[0]: unknown endpoint type 'tpc'"),
        ]
        for text, expected in cases:
            path = self.write(text)
            result = self.run_twistd("tunneld", path)
            self.assertEqual(result.returncode, 1)
            self.assertEqual(result.stdout, "")
            (line,) = result.stderr.splitlines()
            self.assertTrue(line.startswith(f"tunneld: {path}: {expected}"), line)
        result = self.run_twistd("tunneld", "/nonexistent.toml")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "tunneld: /nonexistent.toml: (file): no such file\n")

    def test_twistd_agent_refuses_bad_upstream(self) -> None:
        """twistd tunneld-agent with upstream = "tpc:8000": exit 1, one line, no traceback."""
        with open(os.path.join(ROOT, "etc", "agent.toml")) as f:
            text = f.read().replace('upstream = "tcp:host=127.0.0.1:port=8000"', 'upstream = "tpc:8000"')
        path = self.write(text)
        result = self.run_twistd("tunneld-agent", path)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(
            result.stderr,
            f"tunneld-agent: {path}: tunnels[0].upstream: unknown endpoint type 'tpc' in "
            "'tpc:8000' (e.g. 'tcp:host=127.0.0.1:port=8000')\n",
        )
