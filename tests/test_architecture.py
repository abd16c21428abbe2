"""
The code reads as docs/architecture.md says: every module has a row in its
table (and every row a module), every C{test-case-name} header names test
modules that exist, and no module docstring carries benchmark figures (they
go stale in code; their history is docs/benchmarks.md).
"""

from __future__ import annotations

import ast
import os
import re

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = os.path.join(ROOT, "docs", "architecture.md")

# A row of the module table: | `tunneld/edge/http1.py` | roles | what it is for |
_ROW = re.compile(r"^\| `(tunneld/[^`]*)` \|")
_HEADER = re.compile(r"#\s*-\*-\s*test-case-name:\s*(.+?)\s*-\*-")

# A measured figure: an amount of time, a rate, a share of CPU, a fraction of a
# cost, a benchmark item.  (Sizes such as "1 MiB" and limits such as "30 s" are
# design, not measurement, and pass.)
FIGURE = re.compile(
    r"""
    \b\d[\d,.]*\s*(?:%|ms\b|µs\b|us\b|ns\b|req/s|requests/s|[KMG]i?B/s|[MG]bit|page\ faults)
    | \b(?:half|third|quarter|fifth|sixth|seventh|eighth|tenth)\b[^.;]{0,40}
      \b(?:CPU|faster|slower|less|more|as\ often|latency|throughput)\b
    | \b(?:CPU|latency|throughput|p50|p90|p99)\b[^.;]{0,60}
      \b(?:fell|rose|dropped|halved|doubled|by\ \d|\d+\s*%)
    | benchmarks\.md,?\s+item\s+\d+
    """,
    re.IGNORECASE | re.VERBOSE,
)


def package_modules() -> list[str]:
    """Every module of tunneld as its table row names it: a path, a package as its directory."""
    found = []
    for directory, _, files in os.walk(os.path.join(ROOT, "tunneld")):
        for name in files:
            if not name.endswith(".py"):
                continue
            relative = os.path.relpath(os.path.join(directory, name), ROOT)
            if name == "__init__.py":
                relative = os.path.dirname(relative) + "/"
            found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def table_rows() -> dict[str, str]:
    """The module table of docs/architecture.md: module -> its row."""
    rows = {}
    with open(ARCHITECTURE) as f:
        for line in f:
            match = _ROW.match(line)
            if match:
                rows[match.group(1)] = line.strip()
    return rows


def _source_files() -> list[str]:
    return [
        os.path.join(ROOT, *module.rstrip("/").split("/"))
        + ("/__init__.py" if module.endswith("/") else "")
        for module in package_modules()
    ]


def layer_of(module: str, rows: dict[str, str]) -> str:
    """The layer of C{module}'s package as the table gives it, or a placeholder."""
    package = module.rstrip("/").rpartition("/")[0] + "/"
    row = rows.get(package) if package != "tunneld/" else None
    return row.split("|")[2].strip() if row is not None else "<its layer>"


class ModuleTableTests(SynchronousTestCase):
    def test_every_module_has_a_row(self) -> None:
        """A module that docs/architecture.md's table does not list fails, saying which row to add."""
        rows = table_rows()
        missing = [module for module in package_modules() if module not in rows]
        self.assertEqual(
            missing, [],
            "docs/architecture.md's module table lists no row for: " + ", ".join(missing)
            + ".  Add one per module, among the rows of its layer (the layers are those of "
            "[tool.importlinter] in pyproject.toml):\n"
            + "\n".join(
                f"| `{module}` | {layer_of(module, rows)} | <what it is for, in one line> |"
                for module in missing
            ),
        )

    def test_every_row_is_a_module(self) -> None:
        """A row naming a module that no longer exists fails, saying which to remove or rename."""
        modules = set(package_modules())
        stale = [module for module in table_rows() if module not in modules]
        self.assertEqual(
            stale, [],
            "docs/architecture.md's module table has rows for modules that do not exist: "
            + ", ".join(stale) + ".  Remove those rows, or rename them to where the module went.",
        )

    def test_the_table_is_read(self) -> None:
        """The table parses: it has the layers' anchors (so the two tests above check something)."""
        rows = table_rows()
        for module in ("tunneld/interfaces.py", "tunneld/model/reasons.py", "tunneld/edge/http1/protocol.py"):
            self.assertIn(module, rows)


class HeaderTests(SynchronousTestCase):
    def test_test_case_names_exist(self) -> None:
        """Every '# -*- test-case-name: ... -*-' header of tunneld names test modules that exist."""
        wrong = []
        checked = 0
        for path in _source_files():
            with open(path) as f:
                first = f.readline()
            match = _HEADER.search(first)
            if match is None:
                continue
            for name in match.group(1).split(","):
                checked += 1
                test = os.path.join(ROOT, *name.strip().split(".")) + ".py"
                if not os.path.exists(test):
                    wrong.append(f"{os.path.relpath(path, ROOT)}: {name.strip()}")
        self.assertGreater(checked, 50)
        self.assertEqual(wrong, [], "test-case-name headers naming no test module")


class DocstringFigureTests(SynchronousTestCase):
    def test_the_pattern_finds_figures(self) -> None:
        """The pattern catches the kinds of figure that used to sit in docstrings, and passes design sizes."""
        for text in (
            "one or two cost about a sixth less CPU per MiB",
            "each a walk over the heap: 20-100 ms of wall time",
            "50-240 page faults per MiB relayed",
            "preempted about a quarter as often",
            "and small requests' p99 fell in most runs (docs/benchmarks.md, item 48)",
            "dropping h11 cut the CPU per request by 30%",
        ):
            self.assertIsNotNone(FIGURE.search(text), text)
        for text in (
            "reads of up to 1 MiB and frames of ~128 KiB",
            "a silent client is dropped after 30 s",
            "the first 16 KiB of a body",
        ):
            self.assertIsNone(FIGURE.search(text), text)

    def test_module_docstrings_carry_no_benchmark_figures(self) -> None:
        """No module docstring states a measured figure."""
        found = []
        for path in _source_files():
            relative = os.path.relpath(path, ROOT).replace(os.sep, "/")
            with open(path) as f:
                docstring = ast.get_docstring(ast.parse(f.read())) or ""
            for match in FIGURE.finditer(" ".join(docstring.split())):
                found.append(f"{relative}: ...{match.group(0)}...")
        self.assertEqual(
            found, [],
            "module docstrings with benchmark figures: move them to docs/benchmarks.md",
        )
