"""A TCP chaos proxy (pure Python, threads) to put between the agent and the broker.

    proxy = ChaosProxy(upstream_port=broker.port).start()   # the agent connects to proxy.port
    proxy.cut()                  # reset every open connection (both sides see it at once)
    proxy.blackhole(True)        # connections stay open, nothing gets through: only keepalive notices
    proxy.refuse(True)           # new connections are accepted and reset at once
    proxy.latency(0.05)          # delay every chunk forwarded, both directions
    proxy.heal()                 # all of the above off

Each connection is two pump threads (client -> broker, broker -> client). `stats` counts what the
proxy did, so tests can report how many faults they injected.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter

from tests.support.broker import free_port


class ProxyStats(Counter[str]):
    """What the proxy did: accepted, refused, cuts, connections_cut, chunks_held (0 until it happens)."""

    def __getattr__(self, name: str) -> int:
        return self[name]


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees ECONNRESET, not a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class ChaosProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._blackhole = False
        self._refuse = False
        self._latency_s = 0.0
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(0.2)

    # --- controls --------------------------------------------------------------------------------

    def start(self) -> ChaosProxy:
        threading.Thread(target=self._accept_loop, name="chaos-accept", daemon=True).start()
        return self

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.stats["cuts"] += 1
            self.stats["connections_cut"] += len(pairs)
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def blackhole(self, on: bool = True) -> None:
        self._blackhole = on

    def refuse(self, on: bool = True) -> None:
        self._refuse = on

    def latency(self, seconds: float) -> None:
        self._latency_s = seconds

    def heal(self) -> None:
        self._blackhole = self._refuse = False
        self._latency_s = 0.0

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        self._closing.set()
        self.cut()
        self._listener.close()

    # --- threads ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        if self._refuse:
            self.stats["refused"] += 1
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _reset(client)  # broker down: the agent sees a failed connection, as without the proxy
            return
        for sock in (client, upstream):
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append((client, upstream))
            self.stats["accepted"] += 1
        for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
            threading.Thread(target=self._pump, args=(src, dst), name=f"chaos-{name}", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self._blackhole:
                    self.stats["chunks_held"] += 1
                while self._blackhole and not self._closing.is_set():
                    time.sleep(0.05)  # hold the bytes: like a partition, TCP delivers them in order later
                if self._latency_s:
                    time.sleep(self._latency_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._forget(src, dst)

    def _forget(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if a not in p and b not in p]
        for sock in (a, b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
