"""
Policy: rate limits, connection caps and client addresses, as pure logic on
the reactor clock.  L{tunneld.policy.gate.PublicPolicy} is what the public
listeners consult; the parts are usable (and tested) on their own.
"""
