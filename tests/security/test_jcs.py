"""The RFC 8785 (JCS) signing input: the published vectors (tests/security/jcs_vectors.json) hold for
Python's `rfc8785` and for a 20-line JavaScript signer (jcs_sign.mjs, real Node.js); a Node-signed
command verifies on the device; the pre-JCS form is accepted only during the transition; a payload
with a duplicate member name is refused when it is parsed."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from autoglm_wire.errors import BadJson, Unauthorized
from autoglm_wire.protocol import decode_json_object
from autoglm_wire.signing import (
    ALG,
    CommandSigner,
    CommandVerifier,
    VerifyPolicy,
    canonical_json,
    legacy_signing_input,
    public_key_from_text,
)

HERE = Path(__file__).parent
VECTORS = json.loads((HERE / "jcs_vectors.json").read_text(encoding="utf-8"))
SIGNED = VECTORS["signature"]
NOW = datetime(2026, 12, 1, 10, 0, 30, tzinfo=UTC)
NODE = shutil.which("node")


def node(*args: str, stdin: str) -> str:
    if NODE is None:
        pytest.fail("node is not installed: `apt-get install nodejs` (the cross-language signing test needs it)")
    return subprocess.run([NODE, str(HERE / "jcs_sign.mjs"), *args], input=stdin, capture_output=True, text=True,
                          check=True, timeout=60).stdout


def verifier(legacy_until: datetime | None = None) -> CommandVerifier:
    key = public_key_from_text(SIGNED["public_key_base64"])
    return CommandVerifier(VerifyPolicy(required=True, trusted={"vectors-2026": key}, max_clock_skew_s=60,
                                        replay_window_s=600, legacy_until=legacy_until))


def vector_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(SIGNED["private_key_seed_hex"]))


def check(command: dict, legacy_until: datetime | None = None) -> str | None:
    return verifier(legacy_until).check(command, NOW, NOW)


@pytest.mark.parametrize("vector", VECTORS["canonical"], ids=lambda v: v["name"])
def test_python_and_node_produce_the_published_canonical_form(vector: dict) -> None:
    assert canonical_json(json.loads(vector["input"])).decode("utf-8") == vector["canonical"]
    assert node("canonicalize", stdin=vector["input"]) == vector["canonical"]


def test_the_published_signature_is_reproduced_and_verifies_on_the_device() -> None:
    signed = CommandSigner("vectors-2026", vector_key()).sign(SIGNED["command"])
    assert signed == SIGNED["signed"]  # Ed25519 is deterministic
    assert canonical_json({k: v for k, v in signed.items() if k != "sig"}).decode() == SIGNED["signing_input"]
    assert check(SIGNED["signed"]) == "vectors-2026"


def test_a_command_signed_by_node_verifies_on_the_device(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(vector_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    signed = json.loads(node("sign", str(pem), "vectors-2026", stdin=json.dumps(SIGNED["command"])))
    assert signed["sig"] == SIGNED["signed"]["sig"]
    assert check(decode_json_object(json.dumps(signed).encode(), 65536)) == "vectors-2026"


def legacy_signed() -> dict:
    value = vector_key().sign(legacy_signing_input(SIGNED["command"]))
    return {**SIGNED["command"], "sig": {"key_id": "vectors-2026", "alg": ALG,
                                         "value": base64.b64encode(value).decode()}}


def test_the_pre_jcs_form_verifies_only_during_the_transition() -> None:
    assert legacy_signing_input(SIGNED["command"]) != SIGNED["signing_input"].encode()  # 1e-07 vs 1e-7
    assert check(legacy_signed(), legacy_until=NOW + timedelta(days=1)) == "vectors-2026"
    for after_or_none in (NOW, None):
        with pytest.raises(Unauthorized, match="RFC 8785"):
            check(legacy_signed(), legacy_until=after_or_none)


def test_a_tampered_command_does_not_verify_in_either_form() -> None:
    tampered = {**SIGNED["signed"], "target": "gw-02"}
    with pytest.raises(Unauthorized):
        check(tampered, legacy_until=NOW + timedelta(days=1))


@pytest.mark.parametrize("payload", [
    b'{"kind":"config","target":"gw-b","v":1,"kind":"ping","target":"gw-01"}',  # the prepended duplicates
    b'{"v":1,"params":{"prompt":"a","prompt":"b"}}',
])
def test_a_duplicate_member_name_is_refused_at_parse_time(payload: bytes) -> None:
    with pytest.raises(BadJson, match="appears twice"):
        decode_json_object(payload, 65536)
