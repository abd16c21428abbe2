# -*- test-case-name: tests.test_identity -*-
"""
Which agent this is: the id it says hello with, taken from or checked
against its client certificate at start.

The edge checks the id against the certificate on every hello, so an agent
whose configured id the certificate does not name is stopped here, with the
file and key, rather than refused by the edge forever after.
"""

from __future__ import annotations

from tunneld.config import AgentSection
from tunneld.errors import ConfigError
from tunneld.tls import certificate_file_identity

__all__ = ["resolve_agent_id"]


def resolve_agent_id(agent: AgentSection, where: str) -> str:
    """
    The id this agent says hello with: its certificate's when C{id} is left
    out; C{"agent"} without either.  An id that the certificate does not
    name is a L{ConfigError}: the edge would refuse every hello.
    """
    certificate = agent.tls.certificate
    if not certificate:
        return agent.id or "agent"
    try:
        identity = certificate_file_identity(certificate)
    except Exception as e:  # noqa: BLE001 -- whatever the file holds, say which file
        raise ConfigError(
            where, "agent.tls.certificate", f"cannot read a certificate from {certificate}: {e}"
        ) from None
    if identity.agent_id is None:
        raise ConfigError(
            where, "agent.tls.certificate",
            f"{certificate} names no agent (no tunneld-agent:// URI or DNS name); make one "
            "with `tunneld certs agent --id NAME`",
        )
    if not agent.id:
        return identity.agent_id
    if not identity.is_agent(agent.id):
        raise ConfigError(
            where, "agent.id",
            f"is {agent.id!r} but the certificate {certificate} is for agent "
            f"{identity.agent_id!r}: set id = {identity.agent_id!r}, or leave id out to take "
            "the certificate's",
        )
    return agent.id
