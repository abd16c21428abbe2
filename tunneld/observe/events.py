"""
Stable names of the events tunneld's observability writes.

A log event's identity is its format string (tests and log shippers match
on it); the events below also carry an C{event} field with the name here, so
a JSON-lines consumer can select them without parsing text.
"""

from __future__ import annotations

# An edge or agent told systemd it is ready (fields: status).
READY = "tunneld.ready"
# A daemon could not start and is exiting with status 1 (fields: error, source).
START_FAILED = "tunneld.start_failed"
# A service began stopping (fields: none).
STOPPING = "tunneld.stopping"
# The admin API is listening (fields: host, port).
ADMIN_LISTENING = "tunneld.admin.listening"
# An operator drained one agent session (fields: session, agent, transport).
AGENT_DRAINED = "tunneld.agent.drained"
# The NOTIFY_SOCKET could not be written (fields: error).
NOTIFY_FAILED = "tunneld.notify.failed"

ALL = (READY, START_FAILED, STOPPING, ADMIN_LISTENING, AGENT_DRAINED, NOTIFY_FAILED)
