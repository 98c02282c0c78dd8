"""Loopback networking shared by the launcher (rendezvous port) and the local LLM server."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (whoever needs it binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
