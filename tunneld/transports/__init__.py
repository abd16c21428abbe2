"""
The built-in agent-link transports, each one L{ITransportPlugin}
(L{tunneld.transports.websocket}, the package L{tunneld.transports.grpc}),
and L{tunneld.transports.mux}'s C{FrameLink}, which frame transports,
built-in and third-party, build on.  What C{FrameLink} and the gRPC link
share is in L{tunneld.transports.linkbase}.  They sit beside the core: they
import the seams, the model, the protocol and the support modules, and only
the plugin package (L{tunneld.plugins}) imports them.
"""
