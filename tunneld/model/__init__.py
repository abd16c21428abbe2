"""
The bottom floor: the plain values every other part of tunneld speaks in.

L{tunneld.model.reasons} (why something was refused or ended),
L{tunneld.model.messages} (the tunnel protocol's messages as objects) and
L{tunneld.model.keys} (the name a tunnel goes by).  Nothing here imports
anything else of tunneld's, so every layer above may use it.
"""
