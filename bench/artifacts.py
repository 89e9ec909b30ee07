"""How fast the bridge serves a model artifact (`GET /artifacts/<sha256>?token=...`), against a raw
baseline in the same run: Python's `http.server` serving the same file from the same folder.

Both are downloaded whole by `curl -o /dev/null` over loopback, alternately, `--rounds` times; the
figure is the bridge's rate as a fraction of the baseline's in each round (the token check, the
FastAPI route and the 1 MiB streamed reads are what the bridge adds).

  python bench/artifacts.py                 # a 256 MiB GGUF, 3 rounds
  python bench/artifacts.py --mib 1024 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import http.server
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402

from cloud_bridge import artifacts  # noqa: E402
from cloud_bridge.config import BridgeConfig, ModelsConfig  # noqa: E402
from cloud_bridge.http.app import create_app  # noqa: E402
from cloud_bridge.store.registry import Registry  # noqa: E402
from tests.bridge.conftest import free_port, wait_for_port  # noqa: E402


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass


def write_model(path: Path, mib: int) -> None:
    side = int((mib * (1 << 20) / 4) ** 0.5)
    writer = gguf.GGUFWriter(str(path), "glm4")
    writer.add_context_length(2048)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("token_embd.weight", np.zeros((side, side), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def seconds_to_fetch(url: str) -> float:
    start = time.monotonic()
    subprocess.run(["curl", "-sf", "-o", "/dev/null", url], check=True)
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB (default 256)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-artifacts-") as folder:
        base = Path(folder)
        write_model(base / "model.gguf", args.mib)
        config = BridgeConfig(models=ModelsConfig(dir=base / "models", secret_file=base / "secret"))
        registry = Registry.open(base / "registry.db")
        model, _ = artifacts.register(registry, config.models.dir, base / "model.gguf")
        port, raw_port = free_port(), free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(registry, config, "bench-token-0123456789"),
                                               host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        handler = functools.partial(QuietHandler, directory=str(config.models.dir))
        raw = http.server.ThreadingHTTPServer(("127.0.0.1", raw_port), handler)
        threading.Thread(target=raw.serve_forever, daemon=True).start()
        wait_for_port(port)
        expiry = int(time.time()) + 3600
        token = artifacts.make_token(artifacts.load_secret(config.models.secret_file), model.sha256, "bench", expiry)
        bridge_url = f"http://127.0.0.1:{port}/artifacts/{model.sha256}?token={token}"
        raw_url = f"http://127.0.0.1:{raw_port}/{model.sha256}.gguf"
        megabytes = model.size / 1e6
        print(f"artifact {megabytes:.0f} MB over loopback, curl -o /dev/null")
        for round_ in range(1, args.rounds + 1):
            bridge_rate = megabytes / seconds_to_fetch(bridge_url)
            raw_rate = megabytes / seconds_to_fetch(raw_url)
            print(f"round {round_}: bridge {bridge_rate:.0f} MB/s, http.server {raw_rate:.0f} MB/s, "
                  f"ratio {bridge_rate / raw_rate:.2f}")
        server.should_exit = True
        raw.shutdown()
        registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
