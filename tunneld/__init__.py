"""tunneld: a multiplexing reverse-tunnel proxy on Twisted."""

__version__ = "0.1.0"
