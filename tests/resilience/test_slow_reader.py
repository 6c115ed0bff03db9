"""Reliability contract, scenario 20: a slow-reading client -> proxy memory bounded; other
streams unaffected.

A raw-socket client with a small receive buffer asks for a stream of tens of MiB and reads
nothing. The proxy must stop reading the upstream (proxy/wire.py pauses at 256 KiB buffered,
uvicorn's send waits for the client socket to drain at 64 KiB), so the backlog stays in the
engine: the fake runs with `flow_control`, as vLLM behind uvicorn does, and stalls.

What the proxy holds is measured exactly: the bytes the fake handed to its kernel, minus
everything still queued in the kernel's socket buffers along the path (all four ends live in
this process, so their queues can be read with ioctl), is what sits in the proxy's own memory.
The kernel's part cannot be bounded tightly: the proxy's upstream socket autotunes its receive
buffer up to tcp_rmem's maximum (32 MiB on the dev box, and it did grow to ~25 MiB on a loaded
run), so the end-to-end check is against the host's own limits, with a stream larger still.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import socket
import struct
import sys
import time

import httpx
import orjson
import pytest

from tests.fakes.vllm import FakeVLLM, Streaming, answer_text
from tests.proxy.helpers import CHAT_PATH, chat, events
from tests.resilience.conftest import FakeFactory, Gateway, GatewayFactory, config

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="reads kernel socket queues (Linux ioctls, /proc)"
)

SLOW_ID = "slow-reader"
PADDING = 16 * 1024  # bytes of padding per token event: a few thousand events make tens of MiB
CLIENT_RCVBUF = 16 * 1024
# What the proxy may hold for one stalled stream. proxy/wire.py: its 256 KiB high-water mark
# plus the rest of the read that crossed it (the parser feeds a whole read, up to 256 KiB).
# The relay: the chunk it took from wire (<= 512 KiB), waiting in uvicorn's send for the client
# socket to drain. uvicorn's transport: its 64 KiB high-water mark plus the chunk that crossed
# it (<= 512 KiB). And an event being reassembled by the usage tap (16 KiB here). About 1.6 MiB
# at worst; 0.4 to 1.2 MiB measured (wire 512 KB, uvicorn 84-167 KB, one chunk in hand).
# Unbounded, it is the whole stream (tens of MiB); an 8 MiB high-water mark fails it too.
PROXY_BOUND = 4 * 1024 * 1024
OTHERS = 3
OTHER_TOKENS = 200

_SIOCINQ = 0x541B  # FIONREAD: bytes received, not yet read by the application
# Bytes written by the application and not yet sent. Sent bytes are in the peer's receive queue
# at once on loopback (SIOCOUTQ would count them twice, until acknowledged).
_SIOCOUTQNSD = 0x894B


def kernel_limit() -> int:
    """The most the kernel's socket buffers can queue between the fake and the slow client.

    The fake's send buffer and the proxy's towards the client (autotuned, each at most tcp_wmem's
    maximum), the proxy's upstream receive buffer (autotuned, at most tcp_rmem's maximum) and the
    client's fixed one (which the kernel doubles). A queue's payload stays under its buffer size,
    which also pays for the kernel's bookkeeping.
    """
    with open("/proc/sys/net/ipv4/tcp_rmem") as fh:
        rmem = int(fh.read().split()[2])
    with open("/proc/sys/net/ipv4/tcp_wmem") as fh:
        wmem = int(fh.read().split()[2])
    return rmem + 2 * wmem + 2 * CLIENT_RCVBUF


def _ioctl_int(sock: socket.socket, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


def queued_in_kernel(ports: set[int]) -> int:
    """Bytes in the kernel queues of this process's TCP connections to or from `ports`.

    The fake, the proxy and the client all run in this process, so this is every socket buffer
    between the fake's transport and the slow client: the fake's send queue, the proxy's
    upstream receive queue, the proxy's send queue towards the client, the client's receive
    queue (idle connections add nothing).
    """
    total = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile (another thread's)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)  # not a socket
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            try:
                here, there = sock.getsockname()[1], sock.getpeername()[1]
            except OSError:
                continue  # a listener, or not connected
            if here in ports or there in ports:
                total += _ioctl_int(sock, _SIOCINQ) + _ioctl_int(sock, _SIOCOUTQNSD)
    return total


def slow_stream(fake: FakeVLLM) -> Streaming | None:
    for s in fake.streams():
        if s.request_id == SLOW_ID:
            return s
    return None


async def held_by_proxy(fake: FakeVLLM, gw: Gateway) -> tuple[Streaming, int]:
    """Wait for the slow stream to stall; then (its state, bytes held in the proxy's memory).

    Stalled: the fake is blocked on flow control and has sent nothing more for 0.5 s. The proxy
    then holds what the fake's kernel accepted (sent minus the fake's own backlog) minus what
    the kernel's socket queues hold on the way to the client (the client read nothing). The
    response heads and the chunk framing make this off by a few hundred bytes, no more.
    """
    ports = {fake.port, gw.server.port}
    deadline = time.monotonic() + 10.0
    last: Streaming | None = None
    since = time.monotonic()
    while True:
        now = await asyncio.to_thread(slow_stream, fake)
        if now is None:
            # Not started yet, or over: then the proxy took all of it.
            seen = [r.at for r in fake.completions if r.headers.get("x-request-id") == SLOW_ID]
            ended = last is not None or (seen and time.monotonic() - seen[0] > 1.0)
            assert not ended, f"the slow stream ended: the proxy took all of it ({last})"
        elif now != last:
            last, since = now, time.monotonic()
        elif now.writing_paused and time.monotonic() - since >= 0.5:
            queued = await asyncio.to_thread(queued_in_kernel, ports)
            if await asyncio.to_thread(slow_stream, fake) == now:  # nothing moved meanwhile
                return now, now.bytes_sent - now.buffered - queued
        assert time.monotonic() < deadline, f"the slow stream never stalled: {now}"
        await asyncio.sleep(0.05)


async def normal_stream(client: httpx.AsyncClient) -> float:
    """One ordinary stream through the proxy, checked whole; returns how long it took."""
    began = time.monotonic()
    async with client.stream("POST", CHAT_PATH, json=chat(tokens=OTHER_TOKENS, stream=True)) as r:
        assert r.status_code == 200
        body = await r.aread()
    took = time.monotonic() - began
    got = events(body)
    assert got[-1] == b"[DONE]"
    text = "".join(
        choice["delta"].get("content", "")
        for event in got[:-1]
        for choice in orjson.loads(event)["choices"]
    )
    assert text == answer_text(OTHER_TOKENS)
    return took


def open_slow_client(port: int, tokens: int) -> socket.socket:
    """A raw client with a 16 KiB receive buffer that sends the big stream's request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect: the window scale is fixed by the handshake, and a set SO_RCVBUF also
    # turns the kernel's receive-buffer autotuning off for this socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.settimeout(10.0)
    try:
        sock.connect(("127.0.0.1", port))
        fault = {"token_padding": PADDING, "flow_control": True}
        payload = orjson.dumps(chat(tokens=tokens, stream=True, fake=fault))
        sock.sendall(
            b"POST %b HTTP/1.1\r\nhost: vgate\r\ncontent-type: application/json\r\n"
            b"x-request-id: %b\r\ncontent-length: %d\r\n\r\n%b"
            % (CHAT_PATH.encode(), SLOW_ID.encode(), len(payload), payload)
        )
    except BaseException:
        sock.close()
        raise
    return sock


async def test_a_slow_reader_costs_the_proxy_bounded_memory_and_others_are_unaffected(
    fakes: FakeFactory, gateway: GatewayFactory
) -> None:
    # End to end, the fake may hand at most this much to the kernel while the client reads
    # nothing: 44 MiB on the dev box, for a stream of 55 MiB (at least 40 MiB anywhere).
    path_bound = kernel_limit() + PROXY_BOUND
    tokens = max(2_500, math.ceil(1.25 * path_bound / PADDING))
    fake = fakes()
    gw = gateway(config({"tiny": {"upstreams": [fake.base_url]}}))
    slow = open_slow_client(gw.server.port, tokens)
    try:
        stalled, held = await held_by_proxy(fake, gw)
        # The proxy did not swallow the stream: it holds a bounded amount in its memory, and
        # the rest of the stream is still the engine's to produce.
        assert 0 <= held < PROXY_BOUND, f"the proxy holds {held} bytes of the slow stream"
        assert stalled.bytes_sent - stalled.buffered <= path_bound, (stalled, path_bound)

        # Other streams through the same proxy meanwhile: complete, whole, prompt.
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
            began = time.monotonic()
            took = await asyncio.gather(*(normal_stream(client) for _ in range(OTHERS)))
            assert time.monotonic() - began < 5.0, took

        # The slow stream is still stalled, still bounded.
        again, held_again = await held_by_proxy(fake, gw)
        assert 0 <= held_again < PROXY_BOUND, (
            f"the proxy holds {held_again} bytes of the slow stream"
        )
        assert again.bytes_sent - again.buffered <= path_bound, (again, path_bound)
    finally:
        closed_at = time.monotonic()
        slow.close()

    # The client leaving closes the upstream request: the engine stops generating.
    assert await fake.wait_async(
        lambda r: any(c.request_id == SLOW_ID for c in r.cancelled), 5.0
    ), "the slow stream's upstream request was never closed"
    (gone,) = [c for c in fake.seen.cancelled if c.request_id == SLOW_ID]
    assert gone.at - closed_at < 2.0
    assert again.events_sent <= gone.events_sent < tokens

    # And the proxy keeps serving.
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=10) as client:
        assert await normal_stream(client) < 5.0
    for _ in range(200):  # the proxy's side of the slow stream is over too (bounded wait)
        if not gw.upstream().inflight:
            break
        await asyncio.sleep(0.01)
    assert gw.upstream().inflight == 0
