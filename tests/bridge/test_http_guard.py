"""The body guard over a real uvicorn server and raw sockets: the token is checked before any body
byte is read, and a body past `[http] max_body_bytes` gets 413 without being read to its end.

"Before the body is read" is shown without timing: the client sends only the headers of a huge
request (or a chunked body with no end) and the answer arrives anyway; a server that read the body
first would wait for bytes that never come and the socket read would time out."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry

from .conftest import free_port

TOKEN = "guard-test-token-0123456789"
LIMIT = 64 * 1024
COMMAND = json.dumps({"target": "gw-1", "kind": "ping"}).encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Registry]]:
    registry = Registry.open(Path(tmp_path_factory.mktemp("guard")) / "registry.db")
    config = BridgeConfig.model_validate({"http": {"max_body_bytes": LIMIT}})
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry, config, TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port, registry
    server.should_exit = True
    registry.close()


def send_head(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = [f"POST {path} HTTP/1.1", "Host: bridge", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the response (the server sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body[:length])


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", ["/api/commands", "/v1/chat/completions"])
def test_a_huge_body_without_a_token_is_refused_before_a_byte_of_it_is_sent(server, path: str) -> None:
    port, _ = server
    with send_head(port, path, {"Content-Length": str(400 << 20)}) as sock:
        status, body = read_answer(sock)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"


def test_a_wrong_token_with_a_chunked_body_without_end_is_refused(server) -> None:
    port, _ = server
    with send_head(port, "/api/commands", {"Transfer-Encoding": "chunked", **bearer("wrong-token-0123456789")}) as sock:
        sock.sendall(b"10\r\n" + b"x" * 16 + b"\r\n")
        status, _ = read_answer(sock)
    assert status == 401


def test_an_authenticated_body_announced_over_the_limit_gets_413_before_it_is_sent(server) -> None:
    port, registry = server
    with send_head(port, "/api/commands", {"Content-Length": str(LIMIT + 1), **bearer()}) as sock:
        status, body = read_answer(sock)
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert "max_body_bytes" in body["error"]["message"]
    assert registry.commands.recent("gw-1", 10) == []


def test_an_authenticated_chunked_body_past_the_limit_gets_413_without_being_read_to_its_end(server) -> None:
    port, registry = server
    chunk = b"x" * 4096
    with send_head(port, "/v1/chat/completions", {"Transfer-Encoding": "chunked", **bearer()}) as sock:
        for _ in range(2 * LIMIT // len(chunk)):  # twice the limit, and never the final 0-length chunk
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, body = read_answer(sock)
    assert status == 413
    assert body["error"]["code"] == "body_too_large"


def test_an_authenticated_body_within_the_limit_is_served(server) -> None:
    port, registry = server
    with send_head(port, "/api/commands", {"Content-Length": str(len(COMMAND)), **bearer()}) as sock:
        sock.sendall(COMMAND)
        status, body = read_answer(sock)
    assert status in (200, 201, 202), body
    assert [row.kind for row in registry.commands.recent("gw-1", 10)] == ["ping"]


def test_an_authenticated_chunked_body_within_the_limit_is_served(server) -> None:
    port, registry = server
    with send_head(port, "/api/commands", {"Transfer-Encoding": "chunked", **bearer()}) as sock:
        sock.sendall(b"%x\r\n" % len(COMMAND) + COMMAND + b"\r\n0\r\n\r\n")
        status, body = read_answer(sock)
    assert status in (200, 201, 202), body
