"""
The hardened TLS policy (L{tunneld.tls.hardened_context_options}) holds up
against sslyze's check of Mozilla's "intermediate" configuration, on the
edge's agent-link listener (mutual TLS) and on a public HTTP/1.1 listener
wrapped with the same policy.

sslyze needs an older C{cryptography} than tunneld, so C{scripts/setup}
installs it into its own C{.venv-sslyze}; C{TUNNELD_SSLYZE} may point
elsewhere.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.harness import TunnelHarness
from tests.test_identity import PKI
from tunneld.config import PublicTLSSection


def _sslyze() -> str:
    candidates = [os.environ.get("TUNNELD_SSLYZE", "")]
    root = Path(__file__).resolve().parent.parent
    candidates += [str(root / ".venv-sslyze/bin/sslyze"),
                   str(Path(sys.prefix).parent / ".venv-sslyze/bin/sslyze")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SkipTest("sslyze is not installed: scripts/setup puts it in .venv-sslyze")


class MozillaIntermediateTests(TestCase):
    """sslyze --mozilla_config=intermediate passes on both kinds of TLS listener."""

    timeout = 120

    async def test_agent_and_public_listeners_are_compliant(self) -> None:
        """The edge's agent mTLS listener and its public TLS listener are Mozilla-intermediate compliant."""
        sslyze = _sslyze()
        pki = PKI(self)
        harness = TunnelHarness(self, "websocket", {"listen": "tcp:0:interface=127.0.0.1"})
        # The real edge, with both kinds of TLS listener as configured by users.
        edge = await harness.start_edge(
            agent_tls=pki.edge_tls(),
            public_tls_listen=["tcp:0:interface=127.0.0.1"],
            tls=PublicTLSSection(certificate=pki.edge[0], private_key=pki.edge[1]),
        )
        agent_port = harness.link_address().port
        await edge.public_tls[0].listening
        public_port = edge.public_tls[0].address.port
        client = pki.agent("sslyze", ["scan.example"])
        targets = [f"localhost:{p}{{127.0.0.1}}" for p in (agent_port, public_port)]
        out, err, code = await getProcessOutputAndValue(
            sslyze,
            ["--mozilla_config=intermediate", "--certinfo_ca_file", pki.ca_path,
             "--cert", client[0], "--key", client[1], *targets],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            reactor=reactor,
        )
        text = out.decode("utf-8", "replace")
        verdicts = [line.strip() for line in text.splitlines() if "Compliant" in line]
        self.assertEqual(code, 0, text[-3000:] + err.decode("utf-8", "replace")[-2000:])
        self.assertEqual(
            sorted(verdicts),
            sorted(f"{t.partition('{')[0]}: OK - Compliant." for t in targets),
        )
