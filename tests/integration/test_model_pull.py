"""`edge_agent.model_pull` against a real HTTP(S) server that cuts, refuses and stalls
(tests/support/file_server.py)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tenacity import wait_none

from edge_agent.model_pull import (
    PARTIAL_SUFFIX,
    ChecksumMismatch,
    DownloadFailed,
    NotEnoughDisk,
    Progress,
    ProgressGate,
    UnsafeName,
    name_from_url,
    pull,
    target_path,
)
from tests.security.pki import TestCA
from tests.support.file_server import FileServer, serving

SIZE = 3 * 1024 * 1024 + 123


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "www"
    folder.mkdir()
    data = os.urandom(SIZE)
    (folder / "m.gguf").write_bytes(data)
    return folder, hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(served: tuple[Path, str]):  # noqa: ANN201 - a generator fixture
    with serving(served[0]) as s:
        yield s


def _pull(server: FileServer, digest: str, models: Path, **kw: object):  # noqa: ANN202
    return pull(server.url("m.gguf"), digest, models, wait=wait_none(), **kw)  # type: ignore[arg-type]


def test_a_pull_lands_a_verified_file_and_reports_progress_to_the_end(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    reports: list[Progress] = []
    result = _pull(server, served[1], tmp_path / "models", size=SIZE, on_progress=reports.append)
    assert result.path == (tmp_path / "models" / "m.gguf").resolve()
    assert result.path.read_bytes() == (served[0] / "m.gguf").read_bytes()
    assert (result.size, result.downloaded, result.resumed_from) == (SIZE, SIZE, 0)
    assert not list((tmp_path / "models").glob(f"*{PARTIAL_SUFFIX}"))
    assert reports[-1].done == SIZE and reports[-1].percent == 100.0 and reports[-1].bytes_per_s > 0


def test_cut_connections_are_resumed_with_range_requests_not_restarted(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    server.faults.cut_after, server.faults.cuts_left = 1024 * 1024, 2
    result = _pull(server, served[1], tmp_path / "models")
    assert result.path.read_bytes() == (served[0] / "m.gguf").read_bytes()
    assert server.faults.requests == [None, "bytes=1048576-", "bytes=2097152-"]


def test_a_server_that_ignores_range_restarts_the_file_and_still_verifies(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    server.faults.cut_after, server.faults.cuts_left, server.faults.ignore_range = 1024 * 1024, 1, True
    result = _pull(server, served[1], tmp_path / "models")
    assert result.path.read_bytes() == (served[0] / "m.gguf").read_bytes()
    assert len(server.faults.requests) == 2


def test_503_is_retried_and_404_is_not(server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    server.faults.unavailable = 2
    assert _pull(server, served[1], tmp_path / "a").size == SIZE
    assert len(server.faults.requests) == 3
    server.faults.requests.clear()
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        pull(server.url("missing.gguf"), served[1], tmp_path / "b", wait=wait_none())
    assert len(server.faults.requests) == 1


def test_a_wrong_hash_deletes_the_file_and_says_so(server: FileServer, tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ChecksumMismatch, match="file was deleted"):
        _pull(server, "0" * 64, models)
    assert list(models.iterdir()) == []


def test_a_size_that_does_not_match_the_server_stops_before_the_body(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ChecksumMismatch, match=f"is {SIZE} bytes, not the expected 10"):
        _pull(server, served[1], models, size=10)
    assert list(models.iterdir()) == []


def test_a_link_that_keeps_failing_keeps_the_partial_file_and_the_next_pull_resumes_it(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    server.faults.cut_after, server.faults.cuts_left = 1024 * 1024, 2
    with pytest.raises(DownloadFailed, match="pull again to resume"):
        _pull(server, served[1], models, attempts=2)
    assert (models / f"m.gguf{PARTIAL_SUFFIX}").stat().st_size == 2 * 1024 * 1024
    result = _pull(server, served[1], models)
    assert result.resumed_from == 2 * 1024 * 1024 and result.downloaded == SIZE - 2 * 1024 * 1024
    assert result.path.read_bytes() == (served[0] / "m.gguf").read_bytes()


def test_a_corrupted_partial_file_is_caught_by_the_hash_and_the_next_pull_starts_clean(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / f"m.gguf{PARTIAL_SUFFIX}").write_bytes(b"\0" * 4096)  # what a power cut may leave
    with pytest.raises(ChecksumMismatch):
        _pull(server, served[1], models)
    assert _pull(server, served[1], models).resumed_from == 0


def test_not_enough_disk_is_refused_before_the_first_request(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(NotEnoughDisk, match="free space"):
        _pull(server, served[1], tmp_path / "models", size=SIZE, margin=free)
    assert server.faults.requests == []


def test_names_cannot_leave_the_models_directory(tmp_path: Path) -> None:
    for name in ("../x.gguf", ".hidden", "a/b.gguf", "x.gguf.partial", "", "a..b"):
        with pytest.raises(UnsafeName):
            target_path(tmp_path, name)
    assert name_from_url("https://mirror.lan/glm/glm-edge-1.5b%2Bq4.gguf?token=x") == "glm-edge-1.5b+q4.gguf"
    with pytest.raises(UnsafeName):
        pull("http://127.0.0.1:1/x.gguf", "a" * 64, tmp_path, name="../../etc/passwd")
    with pytest.raises(UnsafeName, match="64 hex digits"):
        pull("http://127.0.0.1:1/m.gguf", "xyz", tmp_path)


def test_an_existing_file_is_kept_when_its_hash_matches_and_refused_when_it_differs(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    _pull(server, served[1], models)
    server.faults.requests.clear()
    assert _pull(server, served[1], models).already_present
    assert server.faults.requests == []
    with pytest.raises(UnsafeName, match="different sha256"):
        _pull(server, "1" * 64, models)


def test_tls_is_verified_against_the_system_or_the_configured_ca(served: tuple[Path, str], tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki")
    cert = ca.issue("mirror", server=True)
    with serving(served[0], tls=(cert.cert, cert.key)) as server:
        with pytest.raises(DownloadFailed, match="not trusted"):
            _pull(server, served[1], tmp_path / "a")
        assert _pull(server, served[1], tmp_path / "b", ca_file=ca.ca_file).size == SIZE


def test_two_pulls_of_the_same_file_do_not_interleave(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    server.faults.bytes_per_s = 1024 * 1024
    child = _pull_in_a_child(server.url("m.gguf"), served[1], models)
    try:
        _wait_for_bytes(models / f"m.gguf{PARTIAL_SUFFIX}")
        with pytest.raises(DownloadFailed, match="another pull"):
            _pull(server, served[1], models)
    finally:
        child.kill()
        child.wait()


def test_kill_9_mid_download_resumes_on_the_next_pull(
        server: FileServer, served: tuple[Path, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    server.faults.bytes_per_s = 1024 * 1024
    child = _pull_in_a_child(server.url("m.gguf"), served[1], models)
    _wait_for_bytes(models / f"m.gguf{PARTIAL_SUFFIX}")
    child.send_signal(signal.SIGKILL)
    child.wait()
    server.faults.bytes_per_s = None
    result = _pull(server, served[1], models)
    assert 0 < result.resumed_from < SIZE
    assert result.path.read_bytes() == (served[0] / "m.gguf").read_bytes()


def test_progress_is_reported_first_then_at_most_once_per_interval_then_last() -> None:
    gate = ProgressGate(1.0)
    assert [gate.due(t, d, 10) for t, d in [(0.0, 1), (0.5, 2), (1.0, 3), (1.2, 4), (1.3, 10)]] == [
        True, False, True, False, True]


def _pull_in_a_child(url: str, digest: str, models: Path) -> subprocess.Popen[bytes]:
    code = ("import sys; from pathlib import Path; from edge_agent.model_pull import pull; "
            "pull(sys.argv[1], sys.argv[2], Path(sys.argv[3]))")
    return subprocess.Popen([sys.executable, "-c", code, url, digest, str(models)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def _wait_for_bytes(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and path.stat().st_size > 0):
        assert time.monotonic() < deadline, f"{path} never grew"
        time.sleep(0.05)
