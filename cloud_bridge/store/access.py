"""Who may call the bridge and what they changed: named API tokens with a role (stored as the
SHA-256 of the token, never the token) and the audit log of every mutating call, API and CLI."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, get_args

from autoglm_wire.protocol import utc_now
from cloud_bridge.errors import BridgeError
from cloud_bridge.store.backends import IntegrityError
from cloud_bridge.store.connection import Connection
from cloud_bridge.store.rows import parse_ts, stamp

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)  # in increasing order of power: each role may do what the ones before may
TOKEN_BYTES = 32
LAST_USED_RESOLUTION = timedelta(minutes=1)
FILE_TOKEN_NAME = "file"  # the `[http] token_file` token (admin), as the audit log names it
ANONYMOUS = "anonymous"   # a call refused before its token was known (401), as the audit log names it
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def role_allows(held: Role, needed: Role) -> bool:
    """Whether a caller holding `held` may do what needs `needed`."""
    return ROLES.index(held) >= ROLES.index(needed)


def token_hash(token: str) -> str:
    """SHA-256 of a token (hex). Tokens are random 256-bit secrets, so no salt or slow hash is needed."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenRow:
    name: str
    role: Role
    created_at: str
    last_used_at: str | None


@dataclass(frozen=True)
class AuditRow:
    id: int
    ts: str
    actor: str    # a token's name, or `cli:<unix user>`
    action: str   # e.g. `POST /api/commands`, `cli send`, `token add`
    target: str   # what it acted on: a device, group, command id, token name, or ""
    outcome: str  # `ok`, or the error (HTTP status and code, or the message)


class Tokens:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def add(self, name: str, role: Role) -> str:
        """Create a token named `name` with `role`; returns the token (shown once, stored hashed)."""
        if role not in ROLES:
            raise BridgeError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not TOKEN_NAME.fullmatch(name) or name in (FILE_TOKEN_NAME, ANONYMOUS):
            raise BridgeError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not "
                              f"{FILE_TOKEN_NAME!r} or {ANONYMOUS!r}, which the audit log uses)")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        try:
            self._db.execute("INSERT INTO api_tokens (name, role, token_sha256, created_at) VALUES (?, ?, ?, ?)",
                             (name, role, token_hash(token), stamp(None)))
        except IntegrityError as exc:
            raise BridgeError(f"a token named {name!r} exists; revoke it first (`cloud-bridge token revoke "
                              f"{name}`) or pick another name") from exc
        return token

    def revoke(self, name: str) -> None:
        """Delete the token named `name`; raises BridgeError when there is none."""
        if not self._db.execute("DELETE FROM api_tokens WHERE name = ?", (name,)):
            raise BridgeError(f"no token named {name!r}; list them with `cloud-bridge token list`")

    def all(self) -> list[TokenRow]:
        return [TokenRow(**row) for row in self._db.query(
            "SELECT name, role, created_at, last_used_at FROM api_tokens ORDER BY name")]

    def identify(self, token: str) -> TokenRow | None:
        """The token row whose hash matches `token` (compared in constant time). Its last use is stamped
        when the stored one is older than LAST_USED_RESOLUTION (no write for every call of a poller)."""
        digest = token_hash(token)
        rows = self._db.query("SELECT name, role, created_at, last_used_at, token_sha256 FROM api_tokens")
        found = None
        for row in rows:  # every row compared, so the time taken does not depend on which one matched
            if hmac.compare_digest(row.pop("token_sha256"), digest):
                found = TokenRow(**row)
        now = utc_now()
        if found is not None and (found.last_used_at is None or
                                  parse_ts(found.last_used_at) < now - LAST_USED_RESOLUTION):
            self._db.execute("UPDATE api_tokens SET last_used_at = ? WHERE name = ?", (stamp(now), found.name))
        return found


class Audit:
    def __init__(self, connection: Connection) -> None:
        self._db = connection

    def record(self, actor: str, action: str, target: str, outcome: str) -> None:
        self._db.execute("INSERT INTO audit_log (ts, actor, action, target, outcome) VALUES (?, ?, ?, ?, ?)",
                         (stamp(None), actor, action, target, outcome))

    def recent(self, limit: int = 100) -> list[AuditRow]:
        """The newest `limit` entries, newest first."""
        return [AuditRow(**row) for row in self._db.query(
            "SELECT id, ts, actor, action, target, outcome FROM audit_log ORDER BY id DESC LIMIT ?", (limit,))]
