"""Clients that go away: the ways a TLS client can leave a connection, for the tests of
what a listener holds (and hears) when its clients leave mid-request."""

from __future__ import annotations

import socket
import ssl
import struct

#: A close without TLS close_notify, one with it, and a TCP reset.
WAYS = ("close", "close-notify", "reset")


def leave(tls: ssl.SSLSocket, way: str) -> None:
    """Go away ``way`` (one of :data:`WAYS`) without reading anything more."""
    if way == "close-notify":
        try:
            tls.unwrap()
        except OSError:  # the server may have closed first
            pass
    elif way == "reset":
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()
