"""
The C{tunneld} command: C{tunneld edge}, C{tunneld agent} and friends.

C{edge} and C{agent} are C{twistd --nodaemon --pidfile= tunneld} and
C{twistd --nodaemon --pidfile= tunneld-agent} with the remaining arguments, so
the console script and systemd units run exactly the same code, and an edge
and an agent started from one directory do not fight over C{twistd.pid}.
"""

from __future__ import annotations

import sys

USAGE = """usage: tunneld COMMAND [ARGS]

commands:
  edge  [--config FILE]   run an edge in the foreground (twistd -n --pidfile= tunneld)
  agent --config FILE     run an agent in the foreground (twistd -n --pidfile= tunneld-agent)
  certs ca|edge|agent|show  make a private CA and edge/agent certificates (tunneld certs -h)
  status [--admin URL]    agents, transports and tunnels of a running edge (admin API)
"""


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command == "certs":
        from tunneld.certs import main as certs_main

        raise SystemExit(certs_main(rest))
    if command == "status":
        from tunneld.status import main as status

        raise SystemExit(status(rest))
    plugin = {"edge": "tunneld", "agent": "tunneld-agent"}.get(command)
    if plugin is None:
        sys.stderr.write(f"tunneld: unknown command {command!r}\n\n{USAGE}")
        raise SystemExit(2)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", plugin, *rest]
    run()


if __name__ == "__main__":
    main()
