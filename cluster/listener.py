"""Listening sockets, bound before anything slow starts.

`k2serve serve` starts Ray, whose processes take ports of their own, and loads the model before its
servers would bind: a port bound only then may already be gone, and a port in use would fail the
command only after all that work. Binding first makes a port in use fail at once, with a message, and
keeps the port ours until the server takes the socket over (asyncio calls listen on it).
"""

from __future__ import annotations

import socket


def bind(host: str, port: int, what: str, send_buffer_bytes: int | None = None) -> socket.socket:
    """A TCP socket bound to (host, port); SystemExit with a message naming `what` when it cannot be.

    `send_buffer_bytes` sets SO_SNDBUF, which the connections it accepts inherit (None: the kernel's
    autotuning, which lets one connection buffer megabytes that its client does not read)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise SystemExit(f"k2serve: cannot listen for the {what} on {host}:{port}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"k2serve: cannot listen for the {what} on {host}:{port}: {exc.strerror}") from None
    return sock
