"""tunneld test suite (trial)."""
