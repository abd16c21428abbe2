"""
The import contracts (pyproject.toml, checked by lint-imports): they hold for
the package as it is, and a deliberately wrong import in a scratch copy of it
breaks them with a message naming the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


PLUGIN = os.path.join("plugins", "streamable-http")


def lint_imports(root: str) -> subprocess.CompletedProcess[str]:
    """
    lint-imports with the project's contracts on the C{tunneld} package under
    C{root} and the streamable-HTTP distribution's source beside it (not the
    wheel installed from it).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.join(root, PLUGIN)]))
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", "--no-logo", "pyproject.toml"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )


class ContractTests(TestCase):
    def scratch_copy(self) -> str:
        """The package and its contracts, copied where a test may break them."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        shutil.copytree(
            os.path.join(ROOT, "tunneld"), os.path.join(root, "tunneld"),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        shutil.copytree(
            os.path.join(ROOT, PLUGIN, "tunneld_streamable_http"),
            os.path.join(root, PLUGIN, "tunneld_streamable_http"),
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        shutil.copy(os.path.join(ROOT, "pyproject.toml"), root)
        return root

    def add_import(self, root: str, module: str, line: str) -> int:
        """Append C{line} to C{module}'s file in the copy; its line number."""
        base = os.path.join(root, PLUGIN) if module.startswith("tunneld_streamable_http") else root
        path = os.path.join(base, *module.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(base, *module.split("."), "__init__.py")
        with open(path) as f:
            count = len(f.read().splitlines())
        with open(path, "a") as f:
            f.write(line + "  # deliberately wrong\n")
        return count + 1

    def assert_caught(self, module: str, line: str, contract: str, *expected: str) -> None:
        root = self.scratch_copy()
        number = self.add_import(root, module, line)
        result = lint_imports(root)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"{contract} BROKEN", " ".join(output.split()))
        for text in expected:
            self.assertIn(text.format(line=number), output)

    def test_the_package_keeps_every_contract(self) -> None:
        """Every contract in pyproject.toml holds for tunneld as it is."""
        result = lint_imports(ROOT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("0 broken", result.stdout)

    def test_a_lower_layer_importing_a_higher_one_is_caught(self) -> None:
        """The router reaching up into the edge breaks the layers, naming the import and its line."""
        self.assert_caught(
            "tunneld.router", "from tunneld.edge.http1 import PublicHTTPFactory",
            "Layers: imports flow down, from the entry points to the bottom floor",
            "tunneld.router is not allowed to import tunneld.edge:",
            "- tunneld.router -> tunneld.edge.http1 (l.{line})",
        )

    def test_siblings_importing_each_other_are_caught(self) -> None:
        """The edge importing the agent breaks their independence."""
        self.assert_caught(
            "tunneld.edge.service", "from tunneld.agent import backoff",
            "Layers: imports flow down, from the entry points to the bottom floor",
            "tunneld.edge is not allowed to import tunneld.agent:",
            "- tunneld.edge.service -> tunneld.agent.backoff (l.{line})",
        )

    def test_config_importing_the_policy_is_caught(self) -> None:
        """The old cycle (config -> policy -> config) cannot come back."""
        self.assert_caught(
            "tunneld.config", "from tunneld.policy.clientaddr import TrustedProxies",
            "Configuration is a pure schema: no edge, agent, policy, plugin registry or transport",
            "tunneld.config is not allowed to import tunneld.policy:",
            "-   tunneld.config -> tunneld.policy.clientaddr (l.{line})",
            "It could be made acyclic by removing 1 dependency:",
        )

    def test_a_transport_importing_the_router_is_caught(self) -> None:
        """A transport may not know about routing."""
        self.assert_caught(
            "tunneld.transports.websocket", "from tunneld.router import Router",
            "Transports import only the seams, the protocol, the model, the support modules "
            "and speedups",
            "tunneld.transports is not allowed to import tunneld.router:",
            "-   tunneld.transports.websocket -> tunneld.router (l.{line})",
        )

    def test_a_plugin_distribution_importing_the_state_backend_is_caught(self) -> None:
        """The streamable-HTTP distribution reaches the state backend only through the seams (EdgeLinkSetup.state): importing it breaks the third-party contract."""
        self.assert_caught(
            "tunneld_streamable_http.edge", "from tunneld.state.memory import MemoryStateBackend",
            "A plugin distribution imports only tunneld's public seams (docs/plugins.md)",
            "tunneld_streamable_http is not allowed to import tunneld.state:",
            "-   tunneld_streamable_http.edge -> tunneld.state.memory (l.{line})",
        )

    def test_a_plugin_distribution_importing_a_builtin_transport_is_caught(self) -> None:
        """A plugin may use FrameLink (tunneld.transports.mux) but not another transport's code."""
        self.assert_caught(
            "tunneld_streamable_http.agent", "from tunneld.transports.websocket import WebSocketTransport",
            "A plugin distribution imports only tunneld's public seams (docs/plugins.md)",
            "tunneld_streamable_http is not allowed to import tunneld.transports.websocket:",
        )

    def test_a_speed_trick_importing_tunneld_is_caught(self) -> None:
        """The speed tricks sit under everything: importing the model breaks their contract."""
        self.assert_caught(
            "tunneld.speedups.memo", "from tunneld.model.reasons import Reason",
            "Speedups import nothing of tunneld's",
            "tunneld.speedups is not allowed to import tunneld.model:",
        )

    def test_a_module_outside_every_layer_is_caught(self) -> None:
        """A new module directly under tunneld/ must be given a layer before it passes."""
        root = self.scratch_copy()
        with open(os.path.join(root, "tunneld", "newcomer.py"), "w") as f:
            f.write('"""A module nobody placed."""\n')
        result = lint_imports(root)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("tunneld.newcomer", result.stdout + result.stderr)
