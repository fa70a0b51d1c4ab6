"""Loaded by every Python process of a test's scratch project (its folder is put on
PYTHONPATH): records each attempt to reach a host other than this machine, one line
per attempt, in the file named by $ATLAS_NET_LOG. An audit hook sees a connection
before DNS or the network can fail, so an offline machine still records it."""

import os
import sys

_LOG = os.environ.get("ATLAS_NET_LOG")
_LOCAL = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}


def _host(event: str, args: tuple):
    if event == "socket.getaddrinfo":
        return args[0]
    if event == "socket.connect":
        addr = args[1]
        return addr[0] if isinstance(addr, tuple) else None  # AF_UNIX paths are local
    return None


def _hook(event: str, args: tuple) -> None:
    if event not in ("socket.getaddrinfo", "socket.connect"):
        return
    host = _host(event, args)
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _LOCAL:
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {' '.join(sys.argv)[:200]!r}: {event} {host}\n")


if _LOG:
    sys.addaudithook(_hook)
