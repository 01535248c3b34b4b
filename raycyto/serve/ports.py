"""Free TCP ports, for processes that must name a port before something listens on it (HAProxy's
stats page and exporter, test endpoints, benchmark servers)."""

from __future__ import annotations

import socket


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports nothing listens on now on ``host`` ("" : every interface); all
    held open while chosen (one port asked for n times may come back twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
