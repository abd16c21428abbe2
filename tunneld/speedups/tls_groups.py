# -*- test-case-name: tests.test_tls_policy -*-
"""
The key-exchange groups a TLS context offers, restricted to a list.

pyOpenSSL has no call that sets a context's groups (curves) to a list: its
public C{set_tmp_ecdh} sets one curve.  The binding underneath it has
OpenSSL's C{SSL_CTX_set1_curves_list}, reached through pyOpenSSL's private
C{OpenSSL._util.lib} and the context's private C{_context} pointer: that is
the trick, and it offers the whole list (X25519 first, the hardened
policy's order).  Without it (L{TRICK} off: the binding lacks the call, or
the switch), L{restrict_groups} falls back to C{set_tmp_ecdh} with the
first elliptic curve of the list that pyOpenSSL can name (P-256 for the
hardened list): still within the policy, just fewer groups.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from tunneld.speedups.switches import Trick

__all__ = ["TRICK", "restrict_groups"]

# The elliptic curves set_tmp_ecdh takes, by the names OpenSSL's lists use:
# cryptography's class, and OpenSSL's short name (what older pyOpenSSL takes).
_P256 = (ec.SECP256R1, "prime256v1")
_P384 = (ec.SECP384R1, "secp384r1")
_P521 = (ec.SECP521R1, "secp521r1")
_CURVES: dict[str, tuple[type[ec.EllipticCurve], str]] = {
    "prime256v1": _P256, "p-256": _P256, "secp256r1": _P256,
    "secp384r1": _P384, "p-384": _P384,
    "secp521r1": _P521, "p-521": _P521,
}


def _setter() -> Any:
    from OpenSSL._util import lib  # the private binding

    return getattr(lib, "SSL_CTX_set1_curves_list", None)


def _check() -> str | None:
    """The private binding has the call, contexts have the pointer, and a list is taken (and a bad one refused)."""
    setter = _setter()
    if setter is None:
        return "pyOpenSSL's binding lacks SSL_CTX_set1_curves_list"
    context = SSL.Context(SSL.TLS_METHOD)
    pointer = getattr(context, "_context", None)
    if pointer is None:
        return "pyOpenSSL's Context has no _context"
    if setter(pointer, b"X25519:prime256v1") != 1 or setter(pointer, b"no-such-group") != 0:
        return "SSL_CTX_set1_curves_list does not answer as OpenSSL documents"
    return None


TRICK = Trick(
    "tls_groups",
    touches="pyOpenSSL's private binding (OpenSSL._util.lib) and Context._context",
    fallback="pyOpenSSL's set_tmp_ecdh: the list's first elliptic curve only",
    check=_check,
)


def restrict_groups(context: SSL.Context, groups: str) -> None:
    """
    Offer only C{groups} (an OpenSSL list, C{"X25519:prime256v1"}) for the
    key exchange; with L{TRICK} off, only the first elliptic curve in it.

    @raise ValueError: OpenSSL refused the list, or (without the trick) it
        names no curve that C{set_tmp_ecdh} can set.
    """
    if TRICK.active:
        if not _setter()(context._context, groups.encode("ascii")):  # type: ignore[attr-defined]
            raise ValueError(f"cannot restrict TLS groups to {groups}")
        return
    for name in groups.split(":"):
        known = _CURVES.get(name.strip().lower())
        if known is not None:
            curve, short_name = known
            try:
                context.set_tmp_ecdh(curve())
            except AttributeError:
                # An older pyOpenSSL takes only its own curve objects.
                context.set_tmp_ecdh(crypto.get_elliptic_curve(short_name))
            return
    raise ValueError(f"cannot restrict TLS groups to {groups}: no curve pyOpenSSL can set")
