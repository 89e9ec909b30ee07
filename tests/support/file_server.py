"""A real HTTP(S) file server for download tests: serves one folder with Range support, and can cut
connections, refuse to resume, fail with 503, or send slowly, the way a flaky uplink or mirror does."""

from __future__ import annotations

import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d+)-")
STEP_BYTES = 64 * 1024  # what the server writes at a time (and sleeps after, when sending slowly)


@dataclass
class Faults:
    """What the server does wrong; tests change it between requests."""

    cut_after: int | None = None  # close the connection after this many body bytes of each response
    cuts_left: int = 0  # how many responses are cut (then it serves normally)
    unavailable: int = 0  # answer this many requests with 503
    ignore_range: bool = False  # answer a Range request with the whole file (200)
    bytes_per_s: float | None = None  # send slowly
    requests: list[str | None] = field(default_factory=list)  # the Range header of every GET


class FileServer:
    def __init__(self, folder: Path, tls: tuple[Path, Path] | None = None) -> None:
        self.folder, self.faults = folder, Faults()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self.server = server
        self.scheme = "https" if tls else "http"

    def url(self, name: str) -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.server.server_address[1]}/{name}"


def _handler(owner: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def do_GET(self) -> None:  # noqa: N802 - the base class's name
            faults = owner.faults
            faults.requests.append(self.headers.get("Range"))
            if faults.unavailable:
                faults.unavailable -= 1
                self.send_error(503, "try later")
                return
            path = owner.folder / urllib.parse.urlsplit(self.path).path.lstrip("/")  # a ?token=... is ignored
            if not path.is_file():
                self.send_error(404)
                return
            size = path.stat().st_size
            match = _RANGE.fullmatch(self.headers.get("Range", ""))
            start = int(match.group(1)) if match and not faults.ignore_range else 0
            if start >= size and match:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            with path.open("rb") as body:  # streamed: a bench model is not read into memory per request
                body.seek(start)
                if faults.cuts_left and faults.cut_after is not None:
                    faults.cuts_left -= 1
                    self.wfile.write(body.read(faults.cut_after))
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                while block := body.read(STEP_BYTES):
                    self.wfile.write(block)
                    if faults.bytes_per_s:
                        time.sleep(len(block) / faults.bytes_per_s)

    return Handler


@contextmanager
def serving(folder: Path, tls: tuple[Path, Path] | None = None) -> Iterator[FileServer]:
    server = FileServer(folder, tls)
    thread = threading.Thread(target=server.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
