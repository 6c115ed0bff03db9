"""A refused connection is closed without destroying its answer (a lingering close).

Closing a socket that still holds unread client bytes makes the kernel send a reset, and a
reset arriving before the client read the answer destroys the answer. So the proxy sends its
refusal, then its FIN, and keeps reading (and dropping) until the client closes or LINGER ends.
"""

from __future__ import annotations

import socket
import threading
import time

from proxy.http.bounds import LINGER
from tests.fakes.harness import ProxyServer
from tests.security.raw import CHAT_PATH


def _pusher(sock: socket.socket, stop: threading.Event) -> threading.Thread:
    """Keeps sending header bytes as fast as the server takes them."""

    def push() -> None:
        junk = b"x-pad: " + b"a" * 8000 + b"\r\n"
        while not stop.is_set():
            try:
                sock.sendall(junk)
            except OSError:
                return

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    return thread


def _read_all(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything until the server's FIN (or a reset), and when it ended."""
    sock.settimeout(within)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic()


def test_a_client_still_sending_gets_its_431_and_then_our_end(server: ProxyServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    stop = threading.Event()
    sock.sendall(f"POST {CHAT_PATH} HTTP/1.1\r\nhost: x\r\n".encode())
    pusher = _pusher(sock, stop)
    began = time.monotonic()
    received, ended = _read_all(sock, within=LINGER + 5)
    stop.set()
    pusher.join(5)
    assert received.startswith(b"HTTP/1.1 431 "), received[:100]
    assert b"connection: close" in received.lower()
    assert ended - began < LINGER  # our FIN came with the answer, not at the end
    # The client may still be writing when the answer arrives (as a trickling or streaming
    # client is): for a while those bytes are read and dropped, not answered with a reset that
    # could reach the client before the answer.
    for _ in range(5):
        sock.sendall(b"still sending")
        time.sleep(0.05)
    sock.close()


def test_a_silent_client_is_closed_within_the_linger(server: ProxyServer) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"POST {CHAT_PATH} HTTP/1.1\r\nhost: x\r\n".encode() + b"x: " + b"a" * 70_000)
    received, _ = _read_all(sock, within=LINGER + 5)
    assert received.startswith(b"HTTP/1.1 431 ")
    # Our side ended; the connection is gone for good once LINGER passed (a write then fails).
    time.sleep(LINGER + 0.5)
    try:
        for _ in range(3):
            sock.sendall(b"more")
            time.sleep(0.1)
        failed = False
    except OSError:
        failed = True
    sock.close()
    assert failed
