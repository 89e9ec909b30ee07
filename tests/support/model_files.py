"""GGUFs to deploy in tests: two different tiny models built by the project (seeds 1 and 2) and a
broken one (a valid header, the tensor data cut short: llama.cpp refuses to load it), served by
tests/support/file_server.py; and the `model` deploy command for one of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.build_gguf import build_model
from tests.support.cloud import CloudClient, command
from tests.support.file_server import FileServer


@dataclass(frozen=True)
class Served:
    file: str  # name under the server's folder
    sha256: str
    size: int


def build_served(folder: Path) -> dict[str, Served]:
    """v1 and v2 (tiny, seeds 1 and 2) and `broken` (v1 truncated to 60 %) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    build_model(folder / "v1.gguf", preset="tiny", seed=1)
    build_model(folder / "v2.gguf", preset="tiny", seed=2)
    data = (folder / "v1.gguf").read_bytes()
    (folder / "broken.gguf").write_bytes(data[: len(data) * 6 // 10])
    served = {}
    for name in ("v1", "v2", "broken"):
        body = (folder / f"{name}.gguf").read_bytes()
        served[name] = Served(f"{name}.gguf", hashlib.sha256(body).hexdigest(), len(body))
    return served


def deploy(server: FileServer, model: Served, name: str, **params: Any) -> dict[str, Any]:
    """A `model` deploy command for a served file (`params`: canary, rollout, or overrides)."""
    body = {"action": "deploy", "name": name, "url": server.url(model.file) + "?token=t0k3n",
            "sha256": model.sha256, "size": model.size, **params}
    return command("model", body)


def events(messages: list[dict[str, Any]], code: str, command_id: str | None = None) -> list[dict[str, Any]]:
    return [e for e in messages if e.get("code") == code
            and (command_id is None or e.get("data", {}).get("command_id") == command_id)]


def serving_sha(cloud: CloudClient, device: str, timeout: float = 60.0) -> str:
    """The sha256 of the model that answers a `complete` now (its reply's provenance)."""
    job = command("complete", {"prompt": "Once", "max_tokens": 4})
    cloud.send(device, job)
    reply = cloud.wait_terminal(job["id"], timeout)
    assert reply["status"] == "succeeded", reply
    return reply["metrics"]["provenance"]["model_sha256"]
