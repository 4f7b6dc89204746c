"""Free TCP ports for the Ray processes these tests start."""
from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1. Every socket stays bound until all are picked: picking
    them one at a time lets the OS hand the same port out twice (CI once started Ray with
    --runtime-env-agent-port and --metrics-export-port equal, and `ray start` refused)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
    assert len(set(ports)) == n
    return ports
