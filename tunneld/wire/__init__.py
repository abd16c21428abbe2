"""
The tunnel protocol's bytes: the protobuf codec of C{proto/tunnel.proto}
(L{tunneld.wire.codec}, over the generated C{tunnel_pb2}) and the link
heartbeat every transport shares (L{tunneld.wire.heartbeat}).

The messages themselves are plain objects in L{tunneld.model.messages};
the stream multiplexer that frame transports build on is
L{tunneld.transports.mux}.
"""
