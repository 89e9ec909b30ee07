"""The production install, as docs/security.md writes it: its shell blocks ("Deploying with real
certificates") run in order, in a scratch root, against a wheelhouse `deploy/dist.sh` builds from this
checkout. The install scripts make fresh venvs from it offline, create the service users (named for
the test, removed after it), and end with each program's `check-config` run as its service user
with the unit's credentials handed over as systemd would: both must pass. Needs root (users,
ownership) and network or pip's cache (the wheelhouse's dependencies)."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECURITY_MD = ROOT / "docs" / "security.md"
AGENT_USER, BRIDGE_USER = "autoglm-t-agent", "autoglm-t-bridge"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the install creates users and sets ownership: run as root"),
    pytest.mark.skipif(shutil.which("runuser") is None, reason="runuser (util-linux) is needed"),
]


def doc_commands() -> str:
    """The sh blocks of docs/security.md's "Deploying with real certificates", in order."""
    text = SECURITY_MD.read_text()
    section = text.split("## Deploying with real certificates", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return "\n".join(textwrap.dedent(block) for block in blocks)


def for_scratch_root(commands: str, root: Path) -> str:
    """The doc's commands pointed at `root`: no sudo, no systemctl, the test's service users."""
    lines = [line for line in commands.splitlines() if "systemctl" not in line]
    script = "\n".join(lines).replace("sudo ", "").replace("/etc/mosquitto/", f"{root}/etc/mosquitto/")
    script = script.replace("deploy/install-agent.sh", f"deploy/install-agent.sh --root {root} --user {AGENT_USER}")
    return script.replace("deploy/install-bridge.sh", f"deploy/install-bridge.sh --root {root} --user {BRIDGE_USER}")


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "wheelhouse"
    env = {**os.environ, "WHEELHOUSE": str(out), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "deploy" / "dist.sh")], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture
def scratch_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="autoglm-root-", dir="/tmp"))
    root.chmod(0o755)  # the service users must reach their files under it
    (root / "etc" / "mosquitto" / "certs").mkdir(parents=True)
    (root / "etc" / "mosquitto" / "conf.d").mkdir()
    try:
        yield root
    finally:
        for user in (AGENT_USER, BRIDGE_USER):
            subprocess.run(["userdel", user], capture_output=True)
        shutil.rmtree(root)


def mode_owner(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return oct(stat.S_IMODE(info.st_mode)), pwd.getpwuid(info.st_uid).pw_name, grp.getgrgid(info.st_gid).gr_name


def test_the_documented_production_install_passes_both_config_checks_as_the_service_users(
        wheelhouse: Path, scratch_root: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "dist").mkdir(parents=True)
    (work / "deploy").symlink_to(ROOT / "deploy")
    (work / "dist" / "wheelhouse").symlink_to(wheelhouse)
    shutil.copy(ROOT / "models" / "tiny-glm4-q4_0.gguf", work / "glm-edge-1.5b-chat-Q4_0.gguf")
    script = "set -euo pipefail\n" + for_scratch_root(doc_commands(), scratch_root)
    started = time.monotonic()
    result = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("config check passed as user") == 2, output
    print(f"documented install (both sides) took {took:.0f} s")

    etc_agent, etc_bridge = scratch_root / "etc" / "edge-agent", scratch_root / "etc" / "cloud-bridge"
    assert mode_owner(etc_agent) == ("0o750", "root", AGENT_USER)
    assert mode_owner(etc_agent / "tls") == ("0o750", "root", AGENT_USER)
    assert mode_owner(etc_agent / "tls" / "gateway.key") == ("0o600", "root", "root")
    assert mode_owner(etc_agent / "edge-agent.toml") == ("0o640", "root", AGENT_USER)
    assert mode_owner(scratch_root / "var" / "lib" / "edge-agent")[1] == AGENT_USER
    assert mode_owner(etc_bridge / "tls") == ("0o750", "root", BRIDGE_USER)
    assert mode_owner(etc_bridge / "keys") == ("0o700", "root", "root")
    assert mode_owner(etc_bridge / "api-token") == ("0o600", "root", "root")
    unit = (scratch_root / "etc" / "systemd" / "system" / "edge-agent.service").read_text()
    assert f"User={AGENT_USER}" in unit and f"ExecStart={scratch_root}/opt/autoglm-edge/.venv/bin/edge-agent" in unit
    assert "not enabled" in output or "enabled" in output

    venv = scratch_root / "opt" / "autoglm-edge" / ".venv"
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                               capture_output=True, text=True, check=True).stdout.lower().replace("_", "-")
    assert "llama-cpp-python" in installed and "fastapi" in installed  # both sides share this scratch venv
    assert "pytest" not in installed and "selenium" not in installed  # no dev extras
    san = subprocess.run(["openssl", "x509", "-in", str(work / "broker.crt"), "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:broker.example.internal" in san and "IP Address:192.0.2.10" in san
    assert (scratch_root / "etc" / "mosquitto" / "conf.d" / "autoglm.conf").is_file()
    assert "pattern" in (scratch_root / "etc" / "mosquitto" / "autoglm.acl").read_text()
