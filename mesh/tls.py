"""TLS contexts from the router's configuration: the listener, and the client side of peer
links (gossip, forwards) and engine calls.

- ``tls_cert`` + ``tls_key``: the listener serves HTTPS, to clients and peers alike.
- ``tls_ca``: peers' certificates are verified against it (on top of the system store,
  which still verifies public engines); without it, the system store alone.
- ``tls_peer_mtls``: the router presents its own certificate when it calls a peer, and the
  listener asks callers for one (optional at the handshake, so API clients need none);
  ``/mesh/gossip`` and forwarded requests without a certificate from ``tls_ca`` are refused.
"""

from __future__ import annotations

import ssl
from typing import Any

from mesh.config import RouterConfig


def server_context(config: RouterConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_peer_mtls and config.tls_ca is not None:
        ctx.load_verify_locations(config.tls_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(config: RouterConfig) -> ssl.SSLContext | None:
    """For calls to peers and engines; None: plain defaults (no TLS configured)."""
    if config.tls_ca is None and not config.tls_peer_mtls:
        return None
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_ca is not None:
        ctx.load_verify_locations(config.tls_ca)
    if config.tls_peer_mtls and config.tls_cert is not None and config.tls_key is not None:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    return ctx


def has_peer_certificate(transport: Any) -> bool:
    """The connection presented a certificate that verified against ``tls_ca``."""
    if transport is None:
        return False
    cert = transport.get_extra_info("peercert")
    return bool(cert)
