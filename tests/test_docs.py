"""The configuration reference in docs/ is generated from the code and current."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tunneld.config import EdgeSection
from tunneld.config.schema import documented_fields
from tunneld.docs import reasons_table, reference
from tunneld.model.reasons import Reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigurationReferenceTests(SynchronousTestCase):
    def test_committed_reference_is_current(self) -> None:
        """docs/configuration.md equals `python -m tunneld.docs` output (regenerate it if not)."""
        with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
            committed = f.read()
        self.assertEqual(
            committed, reference(),
            "docs/configuration.md is stale: run python -m tunneld.docs > docs/configuration.md",
        )

    def test_every_key_is_documented(self) -> None:
        """Every edge key and every built-in transport's table appears with its doc string."""
        text = reference()
        for name, _, _, doc in documented_fields(EdgeSection):
            self.assertIn(f"| `{name}` |", text)
            self.assertTrue(doc, name)
        for table in ("[transports.websocket]", "[transports.grpc]", "[[tunnels]]", "[agent]"):
            self.assertIn(f"### `{table}`", text)

    def test_protocol_reasons_table(self) -> None:
        """docs/protocol.md shows every reason with the status and close code the code maps it to."""
        with open(os.path.join(ROOT, "docs", "protocol.md")) as f:
            self.assertIn(reasons_table(), f.read())

    def test_protocol_grpc_status_table(self) -> None:
        """docs/protocol.md shows the gRPC status and RST_STREAM code the grpc transport ends a call with."""
        from tunneld.transports.grpc import _STATUS_FOR_REASON, rst_code

        lines = ["| reason | `grpc-status` | `RST_STREAM` code |", "|---|---|---|"]
        for reason in Reason:
            status = _STATUS_FOR_REASON[reason]
            lines.append(
                f"| `{reason.value}` | {int(status)} `{status.name}` | `{rst_code(reason).name}` |"
            )
        with open(os.path.join(ROOT, "docs", "protocol.md")) as f:
            self.assertIn("\n".join(lines) + "\n", f.read())
