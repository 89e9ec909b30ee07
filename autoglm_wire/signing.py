"""Signed commands (protocol v1 `sig`): Ed25519 over the RFC 8785 (JCS) form of the command without `sig`.

The signing input is the command object with its `sig` member removed, canonicalized with the JSON
Canonicalization Scheme (RFC 8785, `rfc8785` package): members sorted by their names' UTF-16 code
units, no whitespace, strings with only the escapes JSON requires, numbers as ECMAScript writes
them (`1e-7`, `0.000001`, integers within +-2^53). Any language's JCS library produces the same
bytes (docs/security.md has the scheme and tests/security/jcs_vectors.json the test vectors). A
payload with duplicate member names never gets this far: `decode_json_object` refuses it.

Transition: before JCS, the input was Python's `json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` (`legacy_canonical_json`). A device accepts that form as well until
`VerifyPolicy.legacy_until` (`security.legacy_signatures_until`), then only JCS.

The cloud signs with a private key named by `key_id`; a device trusts a set of public keys by
`key_id`, so a key is rotated by trusting the new one next to the old one, moving the signer over,
then dropping the old.

`CommandVerifier.check` is the device's whole decision (pure: time is passed in). It raises
`Unauthorized` for an unsigned command when signatures are required, an unknown key id, a bad or
tampered signature, a signed command without `target`, and a `created_at` outside the window
[now - replay_window_s - max_clock_skew_s, now + max_clock_skew_s]. A replay of a command id the
device has seen inside the window is the store's business: its dedupe re-sends the stored reply.

Loading keys from files (`load_trusted_keys`, `CommandSigner.from_file`) is the module's only I/O.
`cryptography` is imported when a key is first loaded, so a device that trusts no key and requires
no signature never loads it (about 7 MiB resident).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rfc8785

from autoglm_wire.errors import ConfigError, Unauthorized

if TYPE_CHECKING:  # imported where a key is loaded or used, see the module docstring
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG = "ed25519"
RAW_KEY_BYTES = 32


def canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The RFC 8785 (JCS) form of a JSON object. Raises rfc8785.CanonicalizationError for a value
    JCS cannot represent (an integer beyond +-2^53, NaN or infinity)."""
    return rfc8785.dumps(obj)


def legacy_canonical_json(obj: Mapping[str, Any]) -> bytes:
    """The signed form before JCS: keys sorted by code point, no spaces, UTF-8, Python's numbers."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signing_input(command: Mapping[str, Any]) -> bytes:
    """The bytes a command's signature covers: the JCS form of the command without `sig`."""
    return canonical_json({k: v for k, v in command.items() if k != "sig"})


def legacy_signing_input(command: Mapping[str, Any]) -> bytes:
    return legacy_canonical_json({k: v for k, v in command.items() if k != "sig"})


# --- cloud side ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSigner:
    """Signs commands with one private key; `key_id` tells devices which public key to use."""

    key_id: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def sign(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `command` with `sig` set (any old `sig` replaced)."""
        value = self.private_key.sign(signing_input(command))
        sig = {"key_id": self.key_id, "alg": ALG, "value": base64.b64encode(value).decode("ascii")}
        return {**{k: v for k, v in command.items() if k != "sig"}, "sig": sig}

    @classmethod
    def from_file(cls, path: Path, key_id: str) -> CommandSigner:
        """Read a PEM (PKCS#8) Ed25519 private key. Raises ConfigError saying what to fix."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except OSError as exc:
            raise ConfigError(f"cannot read security.signing_key_file {path}: {exc.strerror}") from exc
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"security.signing_key_file {path} is not an unencrypted PEM private key "
                              "(make one with `openssl genpkey -algorithm ed25519`)") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"security.signing_key_file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key_id=key_id, private_key=key)


def sign_payload(payload: bytes | str, signer: CommandSigner | None) -> bytes:
    """A command payload ready to publish: signed when there is a signer, else unchanged."""
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    if signer is None:
        return data
    return canonical_json(signer.sign(json.loads(data)))


# --- device side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyPolicy:
    """What the device demands of a command's signature and age."""

    required: bool = False
    trusted: Mapping[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)
    max_clock_skew_s: float = 300.0
    replay_window_s: float = 86400.0
    legacy_until: datetime | None = None  # until then the pre-JCS signing input is accepted too


@dataclass(frozen=True)
class CommandVerifier:
    policy: VerifyPolicy

    @property
    def enabled(self) -> bool:
        """False when nothing is required and no key is trusted: `check` would accept anything."""
        return self.policy.required or bool(self.policy.trusted)

    def check(self, command: Mapping[str, Any], created_at: datetime, now: datetime) -> str | None:
        """Raise Unauthorized unless the command may run; the key id that signed it, or None if unsigned.

        `command` is the decoded JSON object as it arrived; `created_at` its parsed `created_at`.
        A signature is checked whenever the device trusts keys; it is required when `policy.required`.
        """
        command_id = command.get("id") if isinstance(command.get("id"), str) else None
        sig = command.get("sig")
        if sig is None:
            if self.policy.required:
                raise Unauthorized("the command is not signed and this device requires signed commands "
                                   "(sign it with a trusted key: `sig` = {key_id, alg, value})", command_id)
            return None
        if not self.policy.trusted:
            return None
        key_id = self._verify_signature(command, sig, command_id, now)
        if not command.get("target"):
            raise Unauthorized("a signed command must carry `target` (the device id or group/G it is for)",
                               command_id)
        self._check_age(created_at, now, command_id)
        return key_id

    def _verify_signature(self, command: Mapping[str, Any], sig: Any, command_id: str | None,
                          now: datetime) -> str:
        from cryptography.exceptions import InvalidSignature  # loaded with the trusted keys already

        key_id = sig.get("key_id") if isinstance(sig, dict) else None
        key = self.policy.trusted.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            raise Unauthorized(f"the command is signed with key_id {key_id!r}, which this device does not trust "
                               f"(trusted: {sorted(self.policy.trusted)})", command_id)
        inputs = [signing_input]
        if self.policy.legacy_until is not None and now < self.policy.legacy_until:
            inputs.append(legacy_signing_input)
        for make_input in inputs:
            try:
                key.verify(base64.b64decode(sig.get("value", ""), validate=True), make_input(command))
                return key_id
            except (binascii.Error, ValueError, TypeError, InvalidSignature, rfc8785.CanonicalizationError):
                continue
        raise Unauthorized(f"the signature (key_id {key_id!r}) does not match the command: it was changed "
                           "after signing, or not signed over the RFC 8785 (JCS) form of the command without "
                           "`sig` (docs/security.md)", command_id)

    def _check_age(self, created_at: datetime, now: datetime, command_id: str | None) -> None:
        skew = timedelta(seconds=self.policy.max_clock_skew_s)
        if created_at > now + skew:
            raise Unauthorized(f"created_at {created_at.isoformat()} is more than {self.policy.max_clock_skew_s:g} s "
                               "in the future: check the clocks of the cloud and this device (NTP)", command_id)
        oldest = now - timedelta(seconds=self.policy.replay_window_s) - skew
        if created_at < oldest:
            raise Unauthorized(f"created_at {created_at.isoformat()} is older than the replay window "
                               f"({self.policy.replay_window_s:g} s): a stale or replayed command; send it again "
                               "with a new id and created_at", command_id)


def public_key_from_text(value: str) -> Ed25519PublicKey:
    """A public key from base64 of its 32 raw bytes, or from PEM text. Raises ValueError."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = value.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"the PEM key is a {type(key).__name__}, not Ed25519")
        return key
    raw = base64.b64decode(text, validate=True)
    if len(raw) != RAW_KEY_BYTES:
        raise ValueError(f"a raw Ed25519 public key is {RAW_KEY_BYTES} bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def is_raw_key(value: str) -> bool:
    """True when `value` is base64 of 32 bytes (else it is taken as the path of a PEM file)."""
    try:
        return len(base64.b64decode(value.strip(), validate=True)) == RAW_KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def load_trusted_keys(values: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """`key_id -> base64 raw key or PEM file path` into keys. Raises ConfigError naming the entry."""
    keys: dict[str, Ed25519PublicKey] = {}
    for key_id, value in values.items():
        where = f"security.trusted_keys.{key_id}"
        try:
            text = value if is_raw_key(value) else Path(value).read_text(encoding="ascii")
            keys[key_id] = public_key_from_text(text)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the public key file {value}: {exc.strerror}") from exc
        except (ValueError, binascii.Error) as exc:
            raise ConfigError(f"{where}: not an Ed25519 public key ({exc}); give base64 of the 32 raw bytes "
                              "or the path of a PEM file (`openssl pkey -pubout`)") from exc
    return keys
