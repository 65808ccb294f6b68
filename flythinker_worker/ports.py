"""Ports for a process group's rendezvous store (MASTER_PORT) that no other process is about to take.

A port found by binding port 0 comes from the kernel's ephemeral range, the same range every outgoing
connection draws its local port from. Between choosing MASTER_PORT and rank 0 binding its store, Ray
starts the group's actors, each opening a dozen connections, and one of them can take that very port:
init_process_group then fails with EADDRINUSE (seen once in CI, in a gloo worker group). Ports between
Ray's worker ports and the ephemeral range are only ever taken by a listening server, which
`master_port_range` callers skip by a bind test; a random window keeps two groups created at once apart.
stdlib only."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Ray's worker processes listen on 10002-19999 by default (`ray start --min-worker-port/--max-worker-port`).
FIRST_PORT = 20000
LINUX_EPHEMERAL = (32768, 60999)  # the kernel's default net.ipv4.ip_local_port_range


def ephemeral_range() -> tuple[int, int]:
    """(first, last) local port the kernel hands to outgoing connections and to bind(port 0)."""
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return first, last
    except (OSError, ValueError):
        return LINUX_EPHEMERAL


def master_port_range(span: int = 256) -> list[int] | None:
    """[start, end) of `span` ports at a random place between Ray's worker ports and the ephemeral range:
    the `master_port_range` verl's RayWorkerGroup scans (from start, taking the first port that binds).
    None where the ephemeral range leaves no room (a node configured so): verl then binds port 0."""
    first_ephemeral, _ = ephemeral_range()
    if first_ephemeral - span <= FIRST_PORT:
        return None
    # SystemRandom: a seeded `random` (every trainer seeds it) would give every group the same window.
    start = random.SystemRandom().randrange(FIRST_PORT, first_ephemeral - span)
    return [start, start + span]


def free_ports(n: int = 1, span: int = 256) -> list[int]:
    """`n` distinct ports that bind right now, taken from a random `master_port_range` window (all held
    open together, so none repeats); where the ephemeral range leaves no room, ports the kernel picks."""
    window = master_port_range(max(span, n))
    candidates = range(*window) if window is not None else [0] * n
    held: list[socket.socket] = []
    try:
        for port in candidates:
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            if len(held) == n:
                return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()
    raise RuntimeError(f"no {n} free ports in {window}: every port there is in use")
