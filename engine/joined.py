"""Whether a headless vLLM node is connected to its head, read from /proc.

A worker node serves no HTTP, so there is no /health to ask. What it does have, once it joined
the head's torch.distributed group, are TCP connections to the head (the rendezvous store,
gloo/NCCL pairs, vLLM's message queues); when the head goes, the kernel closes them. So: a node
is joined while one of its processes holds an ESTABLISHED TCP connection to a head address.

Processes are those of one process group (the engine's: `vgate engine run` starts vLLM in a
session of its own); their sockets are matched by inode against /proc/net/tcp and tcp6 of the
caller's network namespace, which is the engine's.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable

from engine.procs import group_members

_ESTABLISHED = "01"
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def head_ips(host: str) -> set[Address]:
    """Every address `host` (a name or a literal) resolves to; empty if it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    return {_plain(ipaddress.ip_address(info[4][0])) for info in infos}


def _plain(ip: Address) -> Address:
    # An IPv4 peer of a dual-stack socket is listed as ::ffff:a.b.c.d in tcp6.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_address(hex_address: str) -> tuple[Address, int]:
    """One `ADDR:PORT` of /proc/net/tcp{,6}: the address is 32-bit words in host (little-
    endian on every machine vLLM runs on) byte order, the port big-endian hex."""
    addr, port = hex_address.split(":")
    raw = bytes.fromhex(addr)
    # Each 4-byte word is reversed; IPv4 is one word, IPv6 four.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return _plain(ipaddress.ip_address(packed)), int(port, 16)


def established_to(table: str, peers: set[Address]) -> set[int]:
    """Socket inodes of `table` (a /proc/net/tcp{,6} text) with an ESTABLISHED connection to
    one of `peers`."""
    inodes = set()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _ESTABLISHED:
            continue
        remote, _ = parse_address(fields[2])
        if remote in peers:
            inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets `pids` hold open (processes that went meanwhile are skipped)."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def joined(pgid: int, peers: set[Address]) -> bool:
    """Whether a process of group `pgid` is connected to one of `peers`."""
    connected: set[int] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as fh:
                connected |= established_to(fh.read(), peers)
        except OSError:
            continue  # no IPv6 in this kernel
    return bool(connected) and bool(connected & socket_inodes(group_members(pgid)))
