"""Small builders of protocol payloads for the bridge tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from autoglm_wire.protocol import Command, ModelInfo, Reply, Status, StreamChunk, format_ts

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def command(command_id: str = "c1", kind: str = "ping", params: dict[str, Any] | None = None,
            expires_in_s: float | None = 3600.0, device_id: str = "dev-1") -> Command:
    return Command(v=1, id=command_id, kind=kind, params=params or {}, created_at=T0,
                   expires_at=None if expires_in_s is None else at(expires_in_s), target=device_id)


def reply(seq: int, status: str, command_id: str | None = "c1", device_id: str = "dev-1",
          output: dict[str, Any] | None = None, error: dict[str, str] | None = None,
          metrics: dict[str, Any] | None = None) -> Reply:
    return Reply(command_id=command_id, device_id=device_id, status=status, seq=seq, ts=format_ts(T0),
                 output=output, error=error, metrics=metrics or {})


def online(device_id: str = "dev-1", kinds: list[str] | None = None, groups: list[str] | None = None) -> Status:
    return Status(device_id=device_id, state="online", ts=format_ts(T0), agent_version="0.1.0",
                  model=ModelInfo(name="glm-4-tiny", sha256="ab" * 32, arch="glm4", quant="Q4_0", n_gpu_layers=0),
                  kinds=kinds or ["ping", "chat", "complete", "cancel"], groups=groups or [])


def offline(device_id: str = "dev-1") -> Status:
    return Status(device_id=device_id, state="offline")


def chunk(index: int, delta: str, command_id: str = "c1", done: bool = False) -> StreamChunk:
    return StreamChunk(command_id=command_id, index=index, delta=delta, done=done)


def write_gguf(path: Path, arch: str = "glm4", context_length: int = 2048, seed: int = 0) -> Path:
    """A small real GGUF (one tensor; `seed` makes distinct files), written with the gguf package."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(context_length)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_tensor("token_embd.weight", np.arange(seed, seed + 4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def mark_sent(registry: Any, command_id: str, moment: datetime) -> bool:
    """Count one send of the command as the bridge's dispatch loop does (`claim_sends` of the row as
    read now); False when it could not be claimed (a reply moved it past `sent`)."""
    return registry.commands.claim_sends([registry.commands.get(command_id)], moment) == {command_id}
