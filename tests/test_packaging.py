"""
The package as a user installs it: a built wheel carries the twistd drop-in
and the transport plugins, and no dropin.cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from twisted.trial.unittest import TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WheelTests(TestCase):
    timeout = 300

    def test_wheel_installs_twistd_plugins(self) -> None:
        """A wheel installed elsewhere makes `twistd tunneld` and the transports findable."""
        build = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
             "--wheel-dir", build, ROOT],
            check=True, capture_output=True, timeout=240,
        )
        (wheel,) = [f for f in os.listdir(build) if f.endswith(".whl")]
        names = zipfile.ZipFile(os.path.join(build, wheel)).namelist()
        self.assertIn("twisted/plugins/tunneld_dropin.py", names)
        self.assertIn("tunneld/plugins/tunneld_transports.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([n for n in names if n.endswith("dropin.cache")])
        target = os.path.abspath(self.mktemp())
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
             os.path.join(build, wheel)],
            check=True, capture_output=True, timeout=240,
        )
        # Only the installed copy may be visible: run outside the checkout,
        # with the target first on the path.
        script = (
            "import sys; sys.path = [p for p in sys.path if p not in (%r, '', '.')];"
            "sys.path.insert(0, %r);"
            "from twisted.plugin import getPlugins, IPlugin;"
            "from twisted.application.service import IServiceMaker;"
            "import tunneld, tunneld.plugins;"
            "from tunneld.interfaces import ITransportPlugin;"
            "print(tunneld.__file__);"
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker) if p.tapname.startswith('tunneld')));"
            "print(sorted(p.name for p in getPlugins(ITransportPlugin, tunneld.plugins)))"
        ) % (ROOT, target)
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, cwd=target, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertTrue(lines[0].startswith(target), lines[0])
        self.assertEqual(lines[1], "['tunneld', 'tunneld-agent']")
        self.assertIn("'websocket'", lines[2])
