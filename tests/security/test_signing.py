"""autoglm_wire.signing: canonical JSON, Ed25519 signatures, trusted keys by key_id, the age window.
Pure: real crypto, time passed in."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm_wire.errors import ConfigError, Unauthorized
from autoglm_wire.signing import (
    CommandSigner,
    CommandVerifier,
    VerifyPolicy,
    canonical_json,
    load_trusted_keys,
    sign_payload,
)
from cloud_bridge.config import SigningConfig
from tests.security.pki import public_key_base64

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def new_signer(key_id: str = "k1") -> CommandSigner:
    return CommandSigner(key_id, Ed25519PrivateKey.generate())


def verifier(*signers: CommandSigner, required: bool = True) -> CommandVerifier:
    trusted = {s.key_id: s.private_key.public_key() for s in signers}
    return CommandVerifier(VerifyPolicy(required=required, trusted=trusted, max_clock_skew_s=60,
                                        replay_window_s=3600))


def cmd(created_at: datetime = NOW, **envelope: object) -> dict:
    return {"v": 1, "id": "c-1", "kind": "chat", "created_at": created_at.isoformat(), "target": "gw-1",
            "params": {"messages": [{"role": "user", "content": "Grüße"}], "max_tokens": 8}, **envelope}


def check(v: CommandVerifier, command: dict) -> str | None:
    return v.check(command, datetime.fromisoformat(command["created_at"]), NOW)


def test_canonical_json_sorts_keys_drops_spaces_and_keeps_utf8() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == '{"a":{"c":"é","d":[1,2]},"b":1}'.encode()


def test_a_signed_command_verifies_and_names_its_key() -> None:
    signer = new_signer()
    assert check(verifier(signer), signer.sign(cmd())) == "k1"


def test_the_signature_survives_reserialization_with_other_spacing_and_key_order() -> None:
    signer = new_signer()
    signed = signer.sign(cmd())
    reordered = json.loads(json.dumps(dict(reversed(list(signed.items()))), indent=2))
    assert check(verifier(signer), reordered) == "k1"


def test_several_trusted_keys_allow_rotation() -> None:
    old, new = new_signer("2026-a"), new_signer("2026-b")
    both = verifier(old, new)
    assert check(both, old.sign(cmd())) == "2026-a"
    assert check(both, new.sign(cmd())) == "2026-b"


@pytest.mark.parametrize(("change", "reason"), [
    (lambda c: c["params"].update(max_tokens=9999), "does not match"),
    (lambda c: c.update(target="gw-2"), "does not match"),
    (lambda c: c["sig"].update(value=base64.b64encode(b"x" * 64).decode()), "does not match"),
    (lambda c: c["sig"].update(value="not base64!"), "does not match"),
    (lambda c: c["sig"].update(key_id="k9"), "does not trust"),
])
def test_a_tampered_or_unknown_signature_is_unauthorized(change, reason: str) -> None:
    signer = new_signer()
    signed = signer.sign(cmd())
    change(signed)
    with pytest.raises(Unauthorized, match=reason) as caught:
        check(verifier(signer), signed)
    assert caught.value.command_id == "c-1"


def test_an_unsigned_command_is_unauthorized_only_when_signatures_are_required() -> None:
    with pytest.raises(Unauthorized, match="not signed"):
        check(verifier(new_signer()), cmd())
    assert check(verifier(new_signer(), required=False), cmd()) is None


def test_a_signed_command_must_name_its_target() -> None:
    signer = new_signer()
    command = cmd()
    del command["target"]
    with pytest.raises(Unauthorized, match="must carry `target`"):
        check(verifier(signer), signer.sign(command))


@pytest.mark.parametrize(("age", "ok"), [
    (timedelta(0), True), (timedelta(seconds=3600 + 59), True), (timedelta(seconds=-59), True),
    (timedelta(seconds=3600 + 61), False), (timedelta(seconds=-61), False), (timedelta(days=30), False),
])
def test_created_at_must_lie_in_the_window_around_now(age: timedelta, ok: bool) -> None:
    signer = new_signer()
    signed = signer.sign(cmd(created_at=NOW - age))
    if ok:
        assert check(verifier(signer), signed) == "k1"
    else:
        with pytest.raises(Unauthorized, match="created_at"):
            check(verifier(signer), signed)


def test_sign_payload_without_a_signer_leaves_the_bytes_alone() -> None:
    raw = '{"v": 1, "id": "x"}'
    assert sign_payload(raw, None) == raw.encode()
    signed = json.loads(sign_payload(raw, new_signer()))
    assert signed["sig"]["alg"] == "ed25519" and signed["id"] == "x"


def test_trusted_keys_load_from_base64_or_a_pem_file(tmp_path: Path) -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pem = tmp_path / "b.pem"
    pem.write_bytes(b.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    keys = load_trusted_keys({"a": public_key_base64(a.public_key()), "b": str(pem)})
    assert public_key_base64(keys["b"]) == public_key_base64(b.public_key())


def test_a_bad_trusted_key_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="security.trusted_keys.k1: cannot read"):
        load_trusted_keys({"k1": str(tmp_path / "missing.pem")})
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ConfigError, match="not an Ed25519 public key"):
        load_trusted_keys({"k1": str(tmp_path / "junk.pem")})


def test_the_bridge_signer_loads_a_pem_private_key_and_refuses_a_relative_path(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    key.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signer = SigningConfig(signing_key_file=key, key_id="fleet").signer()
    assert signer is not None and signer.key_id == "fleet" and "private" not in repr(signer).lower()
    assert SigningConfig().signer() is None
    with pytest.raises(ValueError, match="absolute path or credential"):
        SigningConfig(signing_key_file=Path("signing.pem"), key_id="fleet")
    with pytest.raises(ValueError, match="go together"):
        SigningConfig(signing_key_file=key)
