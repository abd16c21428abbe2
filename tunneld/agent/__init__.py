"""agent side of tunneld."""
