"""flythinker_worker.ports: rendezvous ports outside the kernel's ephemeral range, spread at random,
skipping ports a server holds."""

import random
import socket
from pathlib import Path

import pytest

from flythinker_worker import ports
from flythinker_worker.ports import FIRST_PORT, ephemeral_range, free_ports, master_port_range


def test_master_port_range_lies_between_ray_worker_ports_and_the_ephemeral_ones():
    first_ephemeral, last_ephemeral = ephemeral_range()
    assert 1024 <= first_ephemeral <= last_ephemeral <= 65535
    proc = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if proc.exists():  # what the kernel says, read here independently
        assert (first_ephemeral, last_ephemeral) == tuple(int(p) for p in proc.read_text().split())
    starts = set()
    for _ in range(50):
        random.seed(0)  # trainers seed `random`; two groups must still get different windows
        start, end = master_port_range(64)
        assert FIRST_PORT <= start and end == start + 64 and end <= first_ephemeral
        starts.add(start)
    assert len(starts) > 40  # 50 draws from ~12,000 starts


def test_free_ports_are_distinct_bindable_and_not_ephemeral():
    found = free_ports(5)
    assert len(set(found)) == 5
    assert all(FIRST_PORT <= p < ephemeral_range()[0] for p in found)
    for port in found:  # released: each binds again
        with socket.socket() as s:
            s.bind(("", port))


def _listener(port):
    s = socket.socket()
    s.bind(("", port))
    s.listen()
    return s


def test_free_ports_skip_a_port_a_server_holds(monkeypatch):
    start = free_ports(1, span=1024)[0]
    window = [start, start + 3]
    monkeypatch.setattr(ports, "master_port_range", lambda span: list(window))
    with _listener(start):
        assert free_ports(2) == [start + 1, start + 2]
        with _listener(start + 1), _listener(start + 2):
            with pytest.raises(RuntimeError, match="no 1 free ports"):
                free_ports(1)


def test_no_room_below_the_ephemeral_range_falls_back_to_kernel_ports(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (FIRST_PORT + 100, 65535))
    assert master_port_range(256) is None  # verl then binds port 0 itself
    found = free_ports(3)
    assert len(set(found)) == 3 and all(p > 0 for p in found)
