"""Model artifacts: what a GGUF file is (its header), keeping it in a content-addressed folder and
the registry (`register`, `unregister`), the signed download tokens devices present, and the byte
ranges the HTTP server answers. No HTTP here (http/model_routes.py serves them).

- **Content-addressed folder** (`[models] dir`): a registered file is copied to `<dir>/<sha256>.gguf`,
  hashed while it is copied, under a temporary name renamed into place (a reader never sees half a
  file; two bridges adding the same file write the same bytes).
- **Download tokens**: `<expiry>.<mac>.<device>` with `mac` = HMAC-SHA256 of `<sha256>:<device>:<expiry>`
  under the bridge's secret (`[models] secret_file`, 32 random bytes made on first use). A token is
  good for one artifact, one device, until `expiry` (Unix seconds). Devices carry no API token: the
  deploy command holds the URL with its token, and the command itself is signed.
- **Ranges**: one `bytes=` range per request (`a-b`, `a-`, `-n`); what cannot be satisfied is 416.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cloud_bridge.errors import BridgeError, InvalidRequest
from cloud_bridge.store.models import ModelRow
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import stamp

COPY_CHUNK = 1 << 20
SECRET_BYTES = 32
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")  # the contract's `name`: not starting with "."
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class BadToken(BridgeError):
    """A download token that is missing, malformed, expired, or not for this artifact and device."""


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF header says about the model."""

    architecture: str | None
    quantization: str | None
    parameters: int | None
    context_length: int | None


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(f"model name {name!r} must be 1-64 characters of [A-Za-z0-9._-], not starting "
                             "with '.'")
    return name


def inspect_gguf(path: Path) -> GgufInfo:
    """Architecture, quantisation (`general.file_type`), parameter count and context length from the
    header of the GGUF at `path`. Raises InvalidRequest when it is not a GGUF file."""
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path, "r")
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidRequest(f"{path} is not a readable GGUF file ({exc}); give a .gguf model file") from exc

    def value(key: str) -> object:
        field = reader.fields.get(key)
        return None if field is None or not field.types else field.contents()

    architecture = value("general.architecture")
    file_type = value("general.file_type")
    quantization = None
    if isinstance(file_type, int):
        try:
            quantization = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = f"file_type {file_type}"
    parameters = value("general.parameter_count")
    if not isinstance(parameters, int):
        parameters = sum(int(tensor.n_elements) for tensor in reader.tensors) or None
    context = value(f"{architecture}.context_length") if isinstance(architecture, str) else None
    return GgufInfo(architecture if isinstance(architecture, str) else None, quantization, parameters,
                    context if isinstance(context, int) else None)


def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read once."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as source:
        while block := source.read(COPY_CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def store_file(source: Path, folder: Path) -> tuple[str, int]:
    """Copy `source` into the content-addressed `folder`, hashing while copying: (sha256, size)."""
    staging = folder / f".{source.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    digest, size = hashlib.sha256(), 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with source.open("rb") as reader, staging.open("wb") as writer:
            while block := reader.read(COPY_CHUNK):
                digest.update(block)
                size += len(block)
                writer.write(block)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(staging, artifact_path(folder, digest.hexdigest()))
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)
    except OSError as exc:
        raise BridgeError(f"cannot copy {source} into [models] dir {folder}: {exc.strerror or exc}; check the "
                          "file is readable and the folder writable, with room for it") from exc
    finally:
        with contextlib.suppress(OSError):  # nothing to remove when the folder itself failed
            staging.unlink(missing_ok=True)
    return digest.hexdigest(), size


def artifact_path(folder: Path, sha256: str) -> Path:
    if not SHA256_PATTERN.match(sha256):
        raise InvalidRequest(f"{sha256!r} is not a sha256 (64 lowercase hex)")
    return folder / f"{sha256}.gguf"


# --- download tokens -----------------------------------------------------------------------------


def load_secret(path: Path) -> bytes:
    """The token secret in `path`, made (0600) on first use."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(SECRET_BYTES) + "\n")
        secret = path.read_text(encoding="utf-8").strip()
    except FileExistsError:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BridgeError(f"cannot read or create [models] secret_file {path}: {exc.strerror}; every bridge "
                          "replica serving artifacts needs the same file") from exc
    if len(secret) < 32:
        raise BridgeError(f"[models] secret_file {path} must hold at least 32 characters")
    return secret.encode("utf-8")


def _mac(secret: bytes, sha256: str, device_id: str, expiry: int) -> str:
    return hmac.new(secret, f"{sha256}:{device_id}:{expiry}".encode(), hashlib.sha256).hexdigest()


def make_token(secret: bytes, sha256: str, device_id: str, expiry: int) -> str:
    """A download token for `device_id` to fetch the artifact `sha256` until `expiry` (Unix seconds)."""
    return f"{expiry}.{_mac(secret, sha256, device_id, expiry)}.{device_id}"


def check_token(secret: bytes, token: str | None, sha256: str, now: float) -> str:
    """The device id the token was made for; BadToken unless it is for `sha256` and not expired."""
    if not token:
        raise BadToken("a download token is required (?token=...): it comes in the deploy command's url")
    parts = token.split(".", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[2]:
        raise BadToken("malformed download token")
    expiry, mac, device_id = int(parts[0]), parts[1], parts[2]
    if not hmac.compare_digest(mac, _mac(secret, sha256, device_id, expiry)):
        raise BadToken("download token not valid for this artifact")
    if now >= expiry:
        raise BadToken("download token expired; start a new rollout (or `rollout resume`) to get a fresh url")
    return device_id


# --- ranges --------------------------------------------------------------------------------------


class Unsatisfiable(ValueError):
    """A Range header no byte of the file satisfies (answer 416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of a `Range: bytes=...` header; None: send the whole file.

    Several ranges, or another unit, are answered with the whole file (RFC 9110 lets a server
    ignore Range).
    """
    if header is None or "," in header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:  # a suffix: the last n bytes
        count = int(last)
        if count == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise Unsatisfiable(header)
    return start, end



# --- registering ---------------------------------------------------------------------------------


def register(registry: Registry, folder: Path, source: Path, name: str | None = None,
             url: str | None = None, now: datetime | None = None) -> tuple[ModelRow, bool]:
    """Register the GGUF at `source` under `name` (default: the file's name without `.gguf`): read its
    header, then copy it into `folder` (content-addressed), or with `url` only hash it (devices
    download it from that mirror). Returns the row and whether it is new."""
    if url is not None and not re.match(r"^https?://", url):
        raise InvalidRequest(f"--url {url!r} must be an http:// or https:// URL")
    if not source.is_file():
        raise InvalidRequest(f"{source} is not a file; give the path of a .gguf model")
    name = check_name(name or source.name.removesuffix(".gguf"))
    info = inspect_gguf(source)
    if url is None:
        sha256, size = store_file(source, folder)
    else:
        sha256, size = file_sha256(source)
    row = ModelRow(sha256=sha256, name=name, size=size, url=url, architecture=info.architecture,
                   quantization=info.quantization, parameters=info.parameters, context_length=info.context_length,
                   added_at=stamp(now))
    try:
        added = registry.models.add(row)
    except InvalidRequest:
        if url is None and registry.models.get(sha256) is None:  # a copy nobody registered
            artifact_path(folder, sha256).unlink(missing_ok=True)
        raise
    return registry.models.get(sha256) or row, added


def unregister(registry: Registry, folder: Path, key: str) -> ModelRow:
    """Forget a model and delete its copy in `folder`."""
    model = registry.models.remove(key)
    artifact_path(folder, model.sha256).unlink(missing_ok=True)
    return model
