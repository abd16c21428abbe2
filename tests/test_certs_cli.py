"""
C{tunneld certs}: every argument checked, every failure a one-line error
naming the option (or file) and a non-zero exit, never a traceback; and no
certificate for a name a verifier cannot match (RFC 6125 wildcards).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tunneld import certs


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """C{tunneld certs ARGV} in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "tunneld.cli", "certs", *argv],
        capture_output=True, text=True, timeout=120,
    )


class CertsCommandTests(SynchronousTestCase):
    """The command as a process: status, stderr, and what it leaves on disk."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.assertEqual(run("ca", "--dir", self.dir).returncode, 0)

    def assertRefused(self, done: subprocess.CompletedProcess[str], text: str) -> None:  # noqa: N802
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn(text, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(sorted(os.listdir(self.dir)), ["ca.key", "ca.pem"])

    def test_negative_days(self) -> None:
        """`tunneld certs agent --days -1` names --days and its range, exits 2, writes nothing."""
        done = run("agent", "--dir", self.dir, "--id", "web1", "--host", "a.example", "--days", "-1")
        self.assertRefused(done, "tunneld certs: --days must be between 1 and 366, got -1")

    def test_wildcard_on_one_label(self) -> None:
        """`tunneld certs edge --host '*.localhost'` is refused with the rule it breaks."""
        done = run("edge", "--dir", self.dir, "--host", "*.localhost")
        self.assertRefused(done, "a wildcard must have at least two labels under it")

    def test_show_missing_file(self) -> None:
        """`tunneld certs show` of a missing file names it and exits 1."""
        missing = os.path.join(self.dir, "nope.pem")
        done = run("show", missing)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stderr, f"tunneld certs: cannot read {missing}: No such file or directory\n")

    def test_good_arguments(self) -> None:
        """Valid names, IPs and wildcards are issued, as before."""
        done = run("edge", "--dir", self.dir, "--host", "edge.example.com", "--host", "*.example.com",
                   "--host", "127.0.0.1", "--host", "::1", "--host", "localhost", "--days", "366")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("hostnames: edge.example.com, *.example.com, localhost, 127.0.0.1, ::1",
                      done.stdout)
        done = run("agent", "--dir", self.dir, "--id", "web-1", "--host", "*.preview.example.com",
                   "--days", "1")
        self.assertEqual(done.returncode, 0, done.stderr)


class CertsArgumentTests(SynchronousTestCase):
    """Each argument's check, in process (the same C{main} the command runs)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(certs.main(["ca", "--dir", self.dir]), 0)

    def refused(self, *argv: str) -> tuple[int, str]:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        try:
            status = certs.main(list(argv))
        except SystemExit as e:  # argparse's own errors (not an int, unknown option)
            status = int(e.code or 0)
        self.assertNotIn("Traceback", err.getvalue())
        return status, err.getvalue()

    def assertArgument(self, argv: list[str], text: str, status: int = 2) -> None:  # noqa: N802
        got, err = self.refused(*argv)
        self.assertEqual(got, status, (argv, err))
        self.assertIn(text, err, argv)
        self.assertTrue(err.rstrip("\n").splitlines()[-1].startswith("tunneld certs: "), err)

    def test_days(self) -> None:
        """--days outside 1..366, or not a number, names --days."""
        for days in ("0", "-1", "367", "100000"):
            self.assertArgument(
                ["edge", "--dir", self.dir, "--host", "a.example", "--days", days],
                f"--days must be between 1 and 366, got {int(days)}",
            )
        self.assertArgument(["agent", "--dir", self.dir, "--id", "a", "--host", "a.example",
                             "--days", "x"], "argument --days: invalid int value: 'x'")

    def test_hostnames(self) -> None:
        """Names RFC 6125 rules out, and names that are no hostname, are refused by --host."""
        cases = {
            "*": "at least two labels under it",
            "*.com": "at least two labels under it",
            "*.localhost": "at least two labels under it",
            "f*.example.com": "the whole left-most label",
            "*x.example.com": "the whole left-most label",
            "a.*.example.com": "the whole left-most label",
            "*.*.example.com": "the whole left-most label",
            "exa_mple.com": "label 'exa_mple' is not letters, digits and inner hyphens",
            "-a.example.com": "label '-a'",
            "a..example.com": "an empty label",
            "example.com.": "an empty label",
            "bücher.example": "its xn-- (IDNA) form",
            "1.2.3": "its last label is a number",
            "a" * 64 + ".example": "(at most 63)",
            "": "an empty hostname",
            "a." * 130 + "com": "longer than 253 characters",
        }
        for host, text in cases.items():
            for kind in (["edge"], ["agent", "--id", "a"]):
                argv = [*kind, "--dir", self.dir, f"--host={host}"]
                self.assertArgument(argv, f"--host: {host!r}: " if host else "--host: ")
                self.assertArgument(argv, text)

    def test_agent_hosts_are_names(self) -> None:
        """An agent's --host may not be an IP address (its grants are DNS names)."""
        self.assertArgument(["agent", "--dir", self.dir, "--id", "a", "--host", "127.0.0.1"],
                            "an IP address, but an agent's hostnames are DNS names")

    def test_agent_id(self) -> None:
        """--id must be one DNS label."""
        for agent_id in ("", "web_1", "-x", "a.b", "a" * 64, "wéb"):
            self.assertArgument(
                ["agent", "--dir", self.dir, f"--id={agent_id}", "--host", "a.example"],
                f"--id: agent id {agent_id!r} must be one DNS label",
            )

    def test_no_host(self) -> None:
        """edge and agent need at least one --host."""
        self.assertArgument(["edge", "--dir", self.dir], "give at least one --host")

    def test_ca_name(self) -> None:
        """The CA's --name is 1 to 64 printable characters."""
        for name in ("", "x" * 65, "a\nb"):
            self.assertArgument(["ca", "--dir", self.mktemp(), "--name", name], "--name")

    def test_dir(self) -> None:
        """--dir that is a file is named; a directory without a CA is a load failure (exit 1)."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("x")
        self.assertArgument(["ca", "--dir", path], f"--dir: {path} exists and is not a directory")
        self.assertArgument(["edge", "--dir", self.mktemp(), "--host", "a.example"],
                            "cannot load the CA", status=1)

    def test_show_not_a_certificate(self) -> None:
        """show of a file that is no PEM certificate names it and exits 1."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assertArgument(["show", path], f"{path} is not a PEM certificate", status=1)

    def test_library_refuses_too(self) -> None:
        """issue_edge and issue_agent refuse the same names (tests and scripts use them directly)."""
        ca = certs.load_issued(os.path.join(self.dir, "ca.pem"), os.path.join(self.dir, "ca.key"))
        with self.assertRaises(ValueError):
            certs.issue_edge(ca, ["*.localhost"])
        with self.assertRaises(ValueError):
            certs.issue_agent(ca, "a", ["f*.example.com"])
        with self.assertRaises(ValueError):
            certs.issue_agent(ca, "a_b", ["a.example"])
