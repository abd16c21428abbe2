"""The built-in agent-link transports; each module is one L{ITransportPlugin}."""
