"""
The tunnel protocol shared by every transport: messages, their protobuf codec
and the stream multiplexer with per-stream credit windows.
"""
