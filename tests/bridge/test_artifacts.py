"""Model artifacts: the GGUF header, the content-addressed copy, download tokens and byte ranges
(pure), and `/artifacts/<sha256>` served in process (FastAPI's TestClient) on a real registry."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cloud_bridge import artifacts
from cloud_bridge.config import BridgeConfig, ModelsConfig
from cloud_bridge.errors import BridgeError, InvalidRequest
from cloud_bridge.http.app import create_app

from .factories import write_gguf

TOKEN = "test-token-0123456789abcdef"
SECRET = b"s" * 64
SHA = "ab" * 32


def test_the_gguf_header_gives_architecture_quantisation_parameters_and_context(tmp_path: Path):
    info = artifacts.inspect_gguf(write_gguf(tmp_path / "m.gguf", arch="glm4", context_length=4096))
    assert info == artifacts.GgufInfo("glm4", "Q4_0", 4096, 4096)


def test_a_file_that_is_not_gguf_is_refused_with_what_to_give(tmp_path: Path):
    (tmp_path / "x.gguf").write_bytes(b"not a model" * 10)
    with pytest.raises(InvalidRequest, match="not a readable GGUF"):
        artifacts.inspect_gguf(tmp_path / "x.gguf")


def test_register_copies_into_the_content_addressed_folder_once(registry, tmp_path: Path):
    source = write_gguf(tmp_path / "glm-a.gguf")
    folder = tmp_path / "models"
    model, added = artifacts.register(registry, folder, source)
    assert added and model.name == "glm-a"
    assert model.sha256 == hashlib.sha256(source.read_bytes()).hexdigest() and model.size == source.stat().st_size
    assert (folder / f"{model.sha256}.gguf").read_bytes() == source.read_bytes()
    assert [p.name for p in folder.iterdir()] == [f"{model.sha256}.gguf"]  # no staging file left
    again, added_again = artifacts.register(registry, folder, source)
    assert not added_again and again == model
    with pytest.raises(InvalidRequest, match="already registered as 'glm-a'"):
        artifacts.register(registry, folder, source, name="other")
    with pytest.raises(InvalidRequest, match="name 'glm-a' is taken"):
        artifacts.register(registry, folder, write_gguf(tmp_path / "b.gguf", seed=7), name="glm-a")
    assert [p.name for p in folder.iterdir()] == [f"{model.sha256}.gguf"]  # the refused file's copy is gone
    with pytest.raises(InvalidRequest, match="must be 1-64 characters"):
        artifacts.register(registry, folder, source, name=".hidden")


def test_a_mirror_url_is_hashed_not_copied_and_remove_deletes_the_copy(registry, tmp_path: Path):
    folder = tmp_path / "models"
    mirrored, _ = artifacts.register(registry, folder, write_gguf(tmp_path / "m.gguf"),
                                     url="http://mirror.lan/m.gguf")
    assert mirrored.url == "http://mirror.lan/m.gguf" and not folder.exists()
    local, _ = artifacts.register(registry, folder, write_gguf(tmp_path / "l.gguf", seed=3))
    assert artifacts.unregister(registry, folder, "l").sha256 == local.sha256
    assert not (folder / f"{local.sha256}.gguf").exists()
    assert [m.name for m in registry.models.all()] == ["m"]


def test_a_token_is_for_one_artifact_one_device_until_its_expiry():
    token = artifacts.make_token(SECRET, SHA, "gw-1", 2000)
    assert artifacts.check_token(SECRET, token, SHA, now=1999) == "gw-1"
    with pytest.raises(artifacts.BadToken, match="expired"):
        artifacts.check_token(SECRET, token, SHA, now=2000)
    with pytest.raises(artifacts.BadToken, match="not valid"):
        artifacts.check_token(SECRET, token, "cd" * 32, now=1)
    forged = token.rsplit(".", 1)[0] + ".gw-2"  # another device's id on gw-1's mac
    with pytest.raises(artifacts.BadToken, match="not valid"):
        artifacts.check_token(SECRET, forged, SHA, now=1)
    later = token.replace("2000.", "9999.", 1)  # a longer life on the same mac
    with pytest.raises(artifacts.BadToken, match="not valid"):
        artifacts.check_token(SECRET, later, SHA, now=1)
    with pytest.raises(artifacts.BadToken, match="not valid"):
        artifacts.check_token(b"t" * 64, token, SHA, now=1)
    for bad in (None, "", "abc", "x.y.z"):
        with pytest.raises(artifacts.BadToken):
            artifacts.check_token(SECRET, bad, SHA, now=1)


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", (0, 9)), ("bytes=10-", (10, 99)), ("bytes=-5", (95, 99)), ("bytes=90-500", (90, 99)),
    ("bytes=-500", (0, 99)), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=-", None),
])
def test_byte_ranges(header, expected):
    assert artifacts.byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=9-3"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(artifacts.Unsatisfiable):
        artifacts.byte_range(header, 100)


def test_the_secret_is_made_once_private_and_then_reused(tmp_path: Path):
    path = tmp_path / "secret"
    first = artifacts.load_secret(path)
    assert artifacts.load_secret(path) == first and len(first) == 64
    assert path.stat().st_mode & 0o777 == 0o600


# --- served ----------------------------------------------------------------------------------------


@pytest.fixture
def served(registry, tmp_path: Path):
    config = BridgeConfig(models=ModelsConfig(dir=tmp_path / "models", secret_file=tmp_path / "secret"))
    model, _ = artifacts.register(registry, config.models.dir, write_gguf(tmp_path / "glm.gguf"))
    secret = artifacts.load_secret(config.models.secret_file)
    with TestClient(create_app(registry, config, TOKEN)) as client:  # no API token: devices have none
        yield client, model, secret


def _url(model, secret: bytes, device: str = "gw-1", expiry: int | None = None) -> str:
    token = artifacts.make_token(secret, model.sha256, device, expiry or int(time.time()) + 600)
    return f"/artifacts/{model.sha256}?token={token}"


def test_a_download_with_a_token_gets_the_whole_file_or_a_range(served, tmp_path: Path):
    client, model, secret = served
    body = (tmp_path / "glm.gguf").read_bytes()
    whole = client.get(_url(model, secret))
    assert whole.status_code == 200 and whole.content == body
    assert whole.headers["accept-ranges"] == "bytes" and int(whole.headers["content-length"]) == len(body)
    part = client.get(_url(model, secret), headers={"Range": "bytes=100-"})
    assert part.status_code == 206 and part.content == body[100:]
    assert part.headers["content-range"] == f"bytes 100-{len(body) - 1}/{len(body)}"
    tail = client.get(_url(model, secret), headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == body[-10:]
    head = client.head(_url(model, secret), headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10" and head.content == b""
    past = client.get(_url(model, secret), headers={"Range": f"bytes={len(body)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(body)}"


def test_a_download_without_a_good_token_is_refused_and_the_api_token_is_not_one(served):
    client, model, secret = served
    assert client.get(f"/artifacts/{model.sha256}").status_code == 403
    expired = client.get(_url(model, secret, expiry=int(time.time()) - 1))
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
    other = artifacts.make_token(secret, "cd" * 32, "gw-1", int(time.time()) + 600)  # another artifact's token
    assert client.get(f"/artifacts/{model.sha256}?token={other}").status_code == 403
    forged = _url(model, secret).rsplit(".", 1)[0] + ".gw-2"
    assert client.get(forged).status_code == 403
    with_api_token = client.get(f"/artifacts/{model.sha256}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert with_api_token.status_code == 403


def test_an_artifact_the_bridge_has_no_copy_of_is_404_and_api_routes_still_need_the_api_token(served, registry):
    client, model, secret = served
    missing = "ef" * 32
    token = artifacts.make_token(secret, missing, "gw-1", int(time.time()) + 600)
    assert client.get(f"/artifacts/{missing}?token={token}").status_code == 404
    assert client.get("/api/models").status_code == 401
    listed = client.get("/api/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert [(m["name"], m["architecture"], m["quantization"], m["context_length"]) for m in listed] == [
        ("glm", "glm4", "Q4_0", 2048)]


def test_register_refuses_what_it_cannot_use_and_says_what_to_do(registry, tmp_path: Path):
    source = write_gguf(tmp_path / "glm.gguf")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the models folder should be")
    with pytest.raises(BridgeError, match="cannot copy .* into \\[models\\] dir"):
        artifacts.register(registry, blocked, source)
    with pytest.raises(InvalidRequest, match="is not a file"):
        artifacts.register(registry, tmp_path, tmp_path / "missing.gguf")
    with pytest.raises(InvalidRequest, match="http:// or https://"):
        artifacts.register(registry, tmp_path, source, url="ftp://mirror/glm.gguf")
    assert registry.models.all() == []
