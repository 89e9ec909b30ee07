"""The systemd units: secrets only through LoadCredential=, and a low `systemd-analyze security`
exposure score where that command can analyse a unit file offline (systemd >= 252)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = {name: ROOT / "systemd" / f"{name}.service" for name in ("edge-agent", "cloud-bridge")}


@pytest.mark.parametrize("name", list(UNITS))
def test_every_credential_the_example_config_names_is_loaded_by_its_unit(name: str) -> None:
    config = (ROOT / "systemd" / f"{name}.toml").read_text()
    unit = UNITS[name].read_text()
    named = set(re.findall(r'^[a-z_]+ = "credential:([\w.-]+)"', config, flags=re.MULTILINE))
    loaded = set(re.findall(r"^LoadCredential=([\w.-]+):", unit, flags=re.MULTILINE))
    assert named and named <= loaded, f"{name}: credentials {named - loaded} are not loaded by the unit"


@pytest.mark.parametrize("name", list(UNITS))
def test_the_unit_scores_at_most_1_5_in_systemd_analyze_security(name: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    local = tmp_path / UNITS[name].name  # ExecStart must exist: point it at this checkout's venv
    venv_bin = str(Path(sys.executable).parent) + "/"
    local.write_text(UNITS[name].read_text().replace("/opt/autoglm-edge/.venv/bin/", venv_bin))
    result = subprocess.run([analyze, "security", "--offline=yes", str(local)], capture_output=True, text=True,
                            timeout=120)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    if result.returncode != 0 or score is None:
        pytest.skip(f"systemd-analyze security --offline does not work here: {result.stderr.strip()[:200]}")
    assert float(score.group(1)) <= 1.5, result.stdout
