"""
twistd plugins for tunneld: C{twistd tunneld} (edge) and C{twistd tunneld-agent}.

ServiceMaker imports the named module only when the plugin is used, so
scanning plugins stays cheap and installs no reactor.
"""

from twisted.application.service import ServiceMaker

tunneld_edge = ServiceMaker(
    "tunneld", "tunneld.tap", "tunneld edge: public listeners and agent links", "tunneld"
)
tunneld_agent = ServiceMaker(
    "tunneld agent", "tunneld.agent_tap", "tunneld agent: dials the edge", "tunneld-agent"
)
