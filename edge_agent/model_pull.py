"""Model downloads: one verified GGUF in the models directory (issue #14, the device side).

`pull` downloads a URL into `<models_dir>/<name>.partial`, hashing while it streams. A cut link is
resumed with an HTTP Range request (tenacity backoff, bounded attempts); a later `pull` of the same
file, after a restart or a power cut, resumes the partial file too (its bytes are hashed once more,
the only re-read). Free disk is checked before the first byte (the remaining size plus a margin).
The file is renamed into place (fsync, rename, fsync of the folder) only when its size and sha256
match; a file that does not match is deleted and reported, never loaded. Names cannot leave the
models directory. TLS is verified against the system's CAs or a configured CA file.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import queue
import re
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from autoglm_wire.backoff import reconnect_wait

CHUNK_BYTES = 1024 * 1024
WRITE_QUEUE_BLOCKS = 16  # received blocks waiting for the disk: at most 16 MiB in memory
SYNC_EVERY_BYTES = 64 * 1024 * 1024  # what a power cut can cost of a partial file
DISK_MARGIN_BYTES = 256 * 1024 * 1024  # left free after the download, for the store and the logs
SOCKET_TIMEOUT_S = 30.0
PARTIAL_SUFFIX = ".partial"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")
_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class PullError(Exception):
    """A download that cannot finish; the message says what to do next."""


class UnsafeName(PullError):
    pass


class NotEnoughDisk(PullError):
    pass


class ChecksumMismatch(PullError):
    """The downloaded bytes are not the expected file (hash or size); the partial file was deleted."""


class DownloadFailed(PullError):
    pass


class _LinkCut(Exception):
    """A transient failure: the next attempt resumes where this one stopped."""


@dataclass(frozen=True)
class Progress:
    done: int
    total: int | None
    bytes_per_s: float

    @property
    def percent(self) -> float | None:
        return None if not self.total else 100.0 * self.done / self.total


@dataclass(frozen=True)
class PullResult:
    path: Path
    size: int
    sha256: str
    resumed_from: int  # bytes already on disk when this pull started
    downloaded: int  # bytes fetched by this pull
    seconds: float
    already_present: bool = False


class ProgressGate:
    """When to report progress: the first report, then at most once per `interval_s`, and the last. Pure."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: float | None = None

    def due(self, now: float, done: int, total: int | None) -> bool:
        if self._last is None or now - self._last >= self.interval_s or (total is not None and done >= total):
            self._last = now
            return True
        return False


def check_sha256(value: str) -> str:
    """The hex digest, lower case; raises UnsafeName when it is not 64 hex digits."""
    digest = value.strip().lower()
    if not _SHA256.fullmatch(digest):
        raise UnsafeName(f"sha256 must be 64 hex digits, got {value!r} (compute it with `sha256sum FILE`)")
    return digest


def target_path(models_dir: Path, name: str) -> Path:
    """`models_dir/name`, refusing any name that is not a plain file name inside the folder."""
    if not _NAME.fullmatch(name) or name.endswith(PARTIAL_SUFFIX) or ".." in name:
        raise UnsafeName(f"model file name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                         f"starting with a letter or digit, not ending in {PARTIAL_SUFFIX}")
    folder = models_dir.resolve()
    path = folder / name
    if path.parent != folder:
        raise UnsafeName(f"model file name {name!r} leaves the models directory {folder}")
    return path


def name_from_url(url: str) -> str:
    """The file name a URL's path ends with (`.../glm-edge-1.5b-q4_0.gguf` -> that name)."""
    last = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
    if not last:
        raise UnsafeName(f"{url} does not end with a file name: pass --name")
    return last


def check_disk(folder: Path, remaining: int | None, margin: int = DISK_MARGIN_BYTES) -> None:
    """Raises NotEnoughDisk unless `remaining` bytes (0 when unknown) plus `margin` fit in `folder`."""
    free = shutil.disk_usage(folder).free
    need = (remaining or 0) + margin
    if free < need:
        raise NotEnoughDisk(f"{folder} has {free / 2**20:.0f} MiB free; the download needs "
                            f"{(remaining or 0) / 2**20:.0f} MiB plus a margin of {margin / 2**20:.0f} MiB: "
                            "free space (remove an old model) or point [models] dir elsewhere")


def hash_file(path: Path) -> tuple[int, hashlib._Hash]:
    """(size, running sha256) of a file, read once."""
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            hasher.update(block)
            size += len(block)
    return size, hasher


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Certificates and host names verified, against `ca_file` or the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


class _Download:
    """One pull's state across attempts: the partial file, its running hash and the bytes on disk."""

    def __init__(self, url: str, partial: BinaryIO, expected_size: int | None, context: ssl.SSLContext,
                 on_progress: Callable[[Progress], None] | None, gate: ProgressGate,
                 disk: Callable[[int | None], None]) -> None:
        self.url, self.partial, self.expected_size = url, partial, expected_size
        self.context, self.on_progress, self.gate, self.disk = context, on_progress, gate, disk
        self.size, self.hasher = hash_file(Path(partial.name))
        self.resumed_from = self.size
        self.total: int | None = expected_size
        self.started = time.monotonic()
        self.unsynced = 0

    def restart(self) -> None:
        """The server will send the whole file: forget what is on disk."""
        self.partial.seek(0)
        self.partial.truncate()
        self.size, self.hasher, self.resumed_from = 0, hashlib.sha256(), 0

    def attempt(self) -> None:
        """Fetch from `self.size` to the end. Raises _LinkCut for what another attempt may fix."""
        if self.total is not None and self.size > self.total:
            self.restart()
        if self.total is not None and self.size == self.total:
            return
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.size}-"} if self.size else {})
        try:
            with urllib.request.urlopen(request, timeout=SOCKET_TIMEOUT_S, context=self.context) as response:
                self._receive(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # nothing after self.size: the partial file is complete, or longer than the file
                self._after_416(exc.headers.get("Content-Range"))
            elif exc.code in _RETRYABLE_STATUS:
                raise _LinkCut(f"HTTP {exc.code} from {self.url}") from exc
            else:
                raise DownloadFailed(f"HTTP {exc.code} {exc.reason} from {self.url}: check the URL (and that "
                                     "its download token has not expired)") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise DownloadFailed(f"{self.url}: the server's certificate is not trusted "
                                     f"({exc.reason.verify_message}): configure the CA that signed it "
                                     "([models] ca_file or --ca-file)") from exc
            raise _LinkCut(f"{self.url}: {exc.reason}") from exc
        except (OSError, http.client.HTTPException) as exc:  # resets, timeouts, a short body
            raise _LinkCut(f"{self.url}: {exc!r}") from exc

    def _after_416(self, content_range: str | None) -> None:
        match = _CONTENT_RANGE.fullmatch(content_range or "")
        total = int(match.group(3)) if match and match.group(3) != "*" else None
        if total is not None and total == self.size:
            self._learn_total(total)
            return
        self.restart()
        raise _LinkCut(f"{self.url} refused to resume at byte {self.size}; starting again from 0")

    def _learn_total(self, total: int) -> None:
        if self.expected_size is not None and total != self.expected_size:
            raise ChecksumMismatch(f"{self.url} is {total} bytes, not the expected {self.expected_size}: "
                                   "check the URL and --size")
        if self.total is None:
            self.disk(total - self.size)
        self.total = total

    def _receive(self, response: http.client.HTTPResponse) -> None:
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or match.group(1) is None or int(match.group(1)) != self.size:
                self.restart()
                raise _LinkCut(f"{self.url} answered a resume at byte {self.size} with the wrong range; "
                               "starting again from 0")
            if match.group(3) != "*":
                self._learn_total(int(match.group(3)))
        else:  # 200: the whole file, whatever was asked
            if self.size:
                self.restart()
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit():
                self._learn_total(int(length))
        received = self.size
        writer = _Writer(self._store)
        try:
            while block := response.read1(CHUNK_BYTES):  # what has arrived: on disk and reported at once
                if self.total is not None and received + len(block) > self.total:
                    raise ChecksumMismatch(f"{self.url} sent more than {self.total} bytes")
                writer.put(block)
                received += len(block)
                self._report(received)
        finally:
            writer.close()  # every block received is on disk and hashed (self.size) before anything else
        self.sync()
        if self.total is not None and self.size < self.total:
            raise _LinkCut(f"{self.url} ended at byte {self.size} of {self.total}")
        if self.total is None:
            self.total = self.size
        self._report(self.size)

    def _store(self, block: bytes) -> None:
        """On the writer's thread: one block written and hashed."""
        self.partial.write(block)
        self.hasher.update(block)
        self.size += len(block)
        self.unsynced += len(block)
        if self.unsynced >= SYNC_EVERY_BYTES:
            self.sync()

    def sync(self) -> None:
        self.partial.flush()
        os.fsync(self.partial.fileno())
        self.unsynced = 0

    def _report(self, done: int) -> None:
        now = time.monotonic()
        if self.on_progress is not None and self.gate.due(now, done, self.total):
            fetched = done - self.resumed_from
            self.on_progress(Progress(done, self.total, fetched / max(now - self.started, 1e-6)))


class _Writer:
    """Writes and hashes the received blocks on a thread of its own, so the disk and the hash overlap
    the network (file writes and sha256 release the GIL) instead of adding to it. At most
    WRITE_QUEUE_BLOCKS blocks wait in memory; a write error is raised by the next `put` or `close`."""

    def __init__(self, store: Callable[[bytes], None]) -> None:
        self._store = store
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=WRITE_QUEUE_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="model-pull-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._store(block)
                except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
                    self._error = exc

    def put(self, block: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(block)

    def close(self) -> None:
        """Wait until every block put is stored; raises the write error, if any."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def pull(url: str, sha256: str, models_dir: Path, *, name: str | None = None, size: int | None = None,
         ca_file: Path | None = None, on_progress: Callable[[Progress], None] | None = None,
         progress_interval_s: float = 1.0, attempts: int = 8, wait: wait_base | None = None,
         margin: int = DISK_MARGIN_BYTES) -> PullResult:
    """Download `url` to `models_dir/name` (default: the URL's file name) if its sha256 is `sha256`.

    Raises UnsafeName, NotEnoughDisk, ChecksumMismatch (the partial file is then deleted), or
    DownloadFailed (after `attempts` transient failures the partial file stays: pull again to resume).
    """
    digest = check_sha256(sha256)
    if size is not None and size < 0:
        raise UnsafeName(f"size must be >= 0, got {size}")
    models_dir.mkdir(parents=True, exist_ok=True)
    path = target_path(models_dir, name or name_from_url(url))
    started = time.monotonic()
    if path.exists():
        have_size, hasher = hash_file(path)
        if hasher.hexdigest() != digest:
            raise UnsafeName(f"{path} exists with a different sha256 ({hasher.hexdigest()}): pass another --name")
        return PullResult(path, have_size, digest, have_size, 0, time.monotonic() - started, already_present=True)
    partial_path = path.with_name(path.name + PARTIAL_SUFFIX)
    with partial_path.open("ab+") as partial:
        try:
            fcntl.flock(partial.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadFailed(f"another pull of {path.name} is running (it holds {partial_path})") from None
        download = _Download(url, partial, size, tls_context(ca_file), on_progress, ProgressGate(progress_interval_s),
                             lambda remaining: check_disk(models_dir, remaining, margin))
        try:
            check_disk(models_dir, None if size is None else max(size - download.size, 0), margin)
        except NotEnoughDisk:
            if download.size == 0:  # nothing kept: leave no empty partial file behind
                partial_path.unlink(missing_ok=True)
            raise
        try:
            for attempt in Retrying(retry=retry_if_exception_type(_LinkCut), stop=stop_after_attempt(attempts),
                                    wait=wait or reconnect_wait(1.0, 2.0, 30.0), reraise=True):
                with attempt:
                    download.attempt()
        except _LinkCut as exc:
            raise DownloadFailed(f"{exc} (after {attempts} attempts); {download.size} bytes are kept in "
                                 f"{partial_path}: pull again to resume") from exc
        except ChecksumMismatch:
            partial_path.unlink(missing_ok=True)
            raise
        _verify(download, digest, size, partial_path)
        os.replace(partial_path, path)
    _sync_folder(path.parent)
    return PullResult(path, download.size, digest, download.resumed_from, download.size - download.resumed_from,
                      time.monotonic() - started)


def _verify(download: _Download, digest: str, size: int | None, partial_path: Path) -> None:
    got = download.hasher.hexdigest()
    if got != digest or (size is not None and download.size != size):
        partial_path.unlink(missing_ok=True)
        raise ChecksumMismatch(f"{download.url} gave {download.size} bytes with sha256 {got}, not the expected "
                               f"{digest}{'' if size is None else f' ({size} bytes)'}; the file was deleted: "
                               "check the URL and the expected hash")


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
