"""What `edge-agent run` loads at import: heavy optional modules stay out until a feature needs them
(docs/performance.md, "Memory")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# cryptography: only with [security] keys; pydantic_settings: not used any more; jsonschema: only for a
# command with response_format; onnxruntime: only with [onnx.models].
LAZY = ("cryptography", "pydantic_settings", "jsonschema", "onnxruntime")


def modules_loaded_by(statement: str) -> dict[str, bool]:
    """Run `statement` in a fresh interpreter; which of LAZY it left in sys.modules."""
    code = f"{statement}; import sys; print(' '.join(str(m in sys.modules) for m in {LAZY!r}))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(zip(LAZY, (word == "True" for word in out.stdout.split()), strict=True))


def test_importing_the_agent_loads_neither_cryptography_nor_pydantic_settings() -> None:
    loaded = modules_loaded_by("import edge_agent.agent")
    assert not any(loaded.values()), f"loaded at import: {[m for m, on in loaded.items() if on]}"


def test_loading_a_trusted_key_loads_cryptography() -> None:
    key = "'" + "A" * 43 + "='"
    statement = f"from autoglm_wire.signing import load_trusted_keys; load_trusted_keys({{'k': {key}}})"
    assert modules_loaded_by(statement)["cryptography"]
