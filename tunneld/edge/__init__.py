"""edge side of tunneld."""
