"""`make demo`: the whole system on this machine, end to end, then a clean shutdown.

Starts a private mosquitto on a free port, an `edge-agent` on the tiny GLM GGUF and a
`cloud-bridge`; sends a `ping` and a streamed `chat` through the bridge's console, prints the
replies and the device list, stops everything with SIGTERM. Exit code 0 only if every step worked.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent_proc import AgentProcess, write_agent_config  # noqa: E402
from tests.support.broker import Broker  # noqa: E402

MODEL = ROOT / "models" / "tiny-glm4-q4_0.gguf"
BRIDGE = [sys.executable, "-m", "cloud_bridge.cli"]
DEVICE = "demo-gateway"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def console(config: Path, *args: str, timeout: float = 120) -> None:
    """Run a `cloud-bridge` console subcommand, echo it, fail the demo if it fails."""
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    print(f"$ cloud-bridge {shown}", flush=True)
    result = subprocess.run([*BRIDGE, args[0], "--config", str(config), *args[1:]], timeout=timeout)
    if result.returncode != 0:
        raise SystemExit(f"demo failed: `cloud-bridge {shown}` exited {result.returncode}")


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo failed: {path} did not appear within {timeout} s")
        time.sleep(0.1)


def main() -> int:
    if not MODEL.exists():
        raise SystemExit(f"{MODEL} is missing: run `make model` first")
    with tempfile.TemporaryDirectory(prefix="autoglm-demo-") as tmp:
        work = Path(tmp)
        step("starting a private mosquitto")
        broker = Broker(work / "broker").start()
        print(f"mosquitto on 127.0.0.1:{broker.port}")
        agent_config = write_agent_config(work / "agent.toml", DEVICE, broker.port, MODEL, work / "agent.db")
        agent = AgentProcess(agent_config, work / "agent.log").start()
        bridge_config = work / "bridge.toml"
        bridge_config.write_text(
            f'[mqtt]\nport = {broker.port}\nclient_id = "demo-bridge"\n'
            f'[store]\npath = "{work / "bridge.db"}"\n[dispatch]\nresend_interval_s = 2\n'
        )
        bridge_log = (work / "bridge.log").open("wb")
        bridge = subprocess.Popen([*BRIDGE, "serve", "--config", str(bridge_config)], stdout=bridge_log,
                                  stderr=subprocess.STDOUT)
        try:
            wait_for_file(work / "bridge.db", timeout=60)
            step(f"edge-agent {DEVICE} and cloud-bridge started; ping through the bridge")
            console(bridge_config, "send", DEVICE, "ping", "--timeout", "90")
            step("chat with the GLM model (tiny random-weight GGUF: the text is gibberish, the tokens are real)")
            console(bridge_config, "send", DEVICE, "chat", "Hello GLM, what can you do at the edge?",
                    "--stream", "--max-tokens", "48", "--seed", "42")
            step("device status as the bridge's registry sees it")
            console(bridge_config, "devices")
            step("shutting down (SIGTERM)")
            agent_rc = agent.terminate()
            bridge.terminate()
            bridge_rc = bridge.wait(timeout=30)
            print(f"edge-agent exited {agent_rc}, cloud-bridge exited {bridge_rc}")
            if agent_rc != 0 or bridge_rc != 0:
                raise SystemExit("demo failed: a service did not exit cleanly")
        except BaseException:
            print("\n--- edge-agent log (tail) ---\n" + "\n".join(agent.log_text().splitlines()[-20:]))
            print("--- cloud-bridge log (tail) ---\n" + "\n".join(
                (work / "bridge.log").read_text(errors="replace").splitlines()[-20:]))
            raise
        finally:
            agent.stop_quietly()
            if bridge.poll() is None:
                bridge.kill()
            broker.stop()
    step("demo finished: every step worked")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.1f} s)")
    sys.exit(code)
