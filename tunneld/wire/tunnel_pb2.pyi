from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    NO_TUNNEL: _ClassVar[Reason]
    AGENT_UNAVAILABLE: _ClassVar[Reason]
    AGENT_GONE: _ClassVar[Reason]
    UPSTREAM_REFUSED: _ClassVar[Reason]
    UPSTREAM_TIMEOUT: _ClassVar[Reason]
    RATE_LIMITED: _ClassVar[Reason]
    CAP_REACHED: _ClassVar[Reason]
    SATURATED: _ClassVar[Reason]
    DRAINING: _ClassVar[Reason]
    PROTOCOL_ERROR: _ClassVar[Reason]
    UNAUTHORIZED: _ClassVar[Reason]
    BAD_REQUEST: _ClassVar[Reason]
    UPSTREAM_ERROR: _ClassVar[Reason]
    CLIENT_GONE: _ClassVar[Reason]
    IDLE_TIMEOUT: _ClassVar[Reason]
    CANCELLED: _ClassVar[Reason]
    SESSION_GONE: _ClassVar[Reason]
REASON_UNSPECIFIED: Reason
NO_TUNNEL: Reason
AGENT_UNAVAILABLE: Reason
AGENT_GONE: Reason
UPSTREAM_REFUSED: Reason
UPSTREAM_TIMEOUT: Reason
RATE_LIMITED: Reason
CAP_REACHED: Reason
SATURATED: Reason
DRAINING: Reason
PROTOCOL_ERROR: Reason
UNAUTHORIZED: Reason
BAD_REQUEST: Reason
UPSTREAM_ERROR: Reason
CLIENT_GONE: Reason
IDLE_TIMEOUT: Reason
CANCELLED: Reason
SESSION_GONE: Reason

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    value: bytes
    def __init__(self, name: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("version", "agent_id", "token", "tunnels", "software", "initial_window", "max_frame_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TUNNELS_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    agent_id: str
    token: str
    tunnels: _containers.RepeatedCompositeFieldContainer[TunnelSpec]
    software: str
    initial_window: int
    max_frame_size: int
    def __init__(self, version: _Optional[int] = ..., agent_id: _Optional[str] = ..., token: _Optional[str] = ..., tunnels: _Optional[_Iterable[_Union[TunnelSpec, _Mapping]]] = ..., software: _Optional[str] = ..., initial_window: _Optional[int] = ..., max_frame_size: _Optional[int] = ...) -> None: ...

class TunnelSpec(_message.Message):
    __slots__ = ("hostname", "path_prefix", "protocol", "port")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIX_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    path_prefix: str
    protocol: str
    port: int
    def __init__(self, hostname: _Optional[str] = ..., path_prefix: _Optional[str] = ..., protocol: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("version", "session_id", "public_urls", "refused", "initial_window", "heartbeat_ms", "max_frame_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_URLS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WINDOW_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    session_id: str
    public_urls: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedCompositeFieldContainer[Refusal]
    initial_window: int
    heartbeat_ms: int
    max_frame_size: int
    def __init__(self, version: _Optional[int] = ..., session_id: _Optional[str] = ..., public_urls: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[_Union[Refusal, _Mapping]]] = ..., initial_window: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ..., max_frame_size: _Optional[int] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("tunnel", "reason", "message")
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tunnel: TunnelSpec
    reason: Reason
    message: str
    def __init__(self, tunnel: _Optional[_Union[TunnelSpec, _Mapping]] = ..., reason: _Optional[_Union[Reason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("kind", "tunnel", "method", "target", "headers", "peer", "scheme", "end_stream")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    tunnel: str
    method: str
    target: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    peer: str
    scheme: str
    end_stream: bool
    def __init__(self, kind: _Optional[str] = ..., tunnel: _Optional[str] = ..., method: _Optional[str] = ..., target: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., peer: _Optional[str] = ..., scheme: _Optional[str] = ..., end_stream: _Optional[bool] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("status", "reason", "headers", "end_stream")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    status: int
    reason: bytes
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    end_stream: bool
    def __init__(self, status: _Optional[int] = ..., reason: _Optional[bytes] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., end_stream: _Optional[bool] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("data", "end_stream")
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_STREAM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    end_stream: bool
    def __init__(self, data: _Optional[bytes] = ..., end_stream: _Optional[bool] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("trailers",)
    TRAILERS_FIELD_NUMBER: _ClassVar[int]
    trailers: _containers.RepeatedCompositeFieldContainer[Header]
    def __init__(self, trailers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ...) -> None: ...

class Reset(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: Reason
    message: str
    def __init__(self, reason: _Optional[_Union[Reason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("increment",)
    INCREMENT_FIELD_NUMBER: _ClassVar[int]
    increment: int
    def __init__(self, increment: _Optional[int] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("opaque",)
    OPAQUE_FIELD_NUMBER: _ClassVar[int]
    opaque: int
    def __init__(self, opaque: _Optional[int] = ...) -> None: ...

class GoAway(_message.Message):
    __slots__ = ("reason", "message", "reconnect_to")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_TO_FIELD_NUMBER: _ClassVar[int]
    reason: Reason
    message: str
    reconnect_to: str
    def __init__(self, reason: _Optional[_Union[Reason, str]] = ..., message: _Optional[str] = ..., reconnect_to: _Optional[str] = ...) -> None: ...

class Health(_message.Message):
    __slots__ = ("tunnel", "healthy", "detail")
    TUNNEL_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    tunnel: str
    healthy: bool
    detail: str
    def __init__(self, tunnel: _Optional[str] = ..., healthy: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("stream_id", "hello", "welcome", "open", "reply", "data", "end", "reset", "window", "ping", "pong", "goaway", "health")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    GOAWAY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    hello: Hello
    welcome: Welcome
    open: Open
    reply: Reply
    data: Data
    end: End
    reset: Reset
    window: Window
    ping: Ping
    pong: Ping
    goaway: GoAway
    health: Health
    def __init__(self, stream_id: _Optional[int] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., welcome: _Optional[_Union[Welcome, _Mapping]] = ..., open: _Optional[_Union[Open, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ..., data: _Optional[_Union[Data, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ..., reset: _Optional[_Union[Reset, _Mapping]] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., pong: _Optional[_Union[Ping, _Mapping]] = ..., goaway: _Optional[_Union[GoAway, _Mapping]] = ..., health: _Optional[_Union[Health, _Mapping]] = ...) -> None: ...
