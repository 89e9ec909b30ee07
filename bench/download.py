"""A model download through `edge_agent.model_pull.pull` (Range-capable, sha256 while streaming,
fsync every 64 MiB and at the end, rename) against a plain single-stream HTTP GET of the same file
from the same local server into /dev/null (no hashing, no disk), in the same run. Prints both rates
and their ratio (issue #14's target: >= 0.9, hashing included).

  python bench/download.py                          # models/bench-glm4-q4_0.gguf, 3 rounds each
  python bench/download.py --link-mib-s 50          # the server sends at most 50 MiB/s (a ~400 Mbit/s link)
  python bench/download.py --file big.gguf --rounds 5 --dir /var/lib/edge-agent/models

Rounds alternate (GET, pull, GET, pull, ...) so a warming page cache or CPU frequency favours
neither; the figure is the median of each.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.model_pull import CHUNK_BYTES, pull  # noqa: E402
from tests.support.file_server import FileServer  # noqa: E402


def serve(folder: Path, bytes_per_s: float | None, port: multiprocessing.Queue) -> None:
    """The file server, in a process of its own: its threads do not compete with the client's for one GIL."""
    server = FileServer(folder)
    server.faults.bytes_per_s = bytes_per_s
    port.put(server.url(""))
    server.server.serve_forever()


def plain_get(url: str) -> float:
    """Seconds to GET `url` into /dev/null with one stream, reading blocks as pull does."""
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response, open("/dev/null", "wb") as sink:
        while block := response.read1(CHUNK_BYTES):
            sink.write(block)
    return time.perf_counter() - started


def pulled(url: str, digest: str, size: int, folder: Path) -> float:
    """Seconds for a full pull into `folder` (the file is deleted afterwards)."""
    started = time.perf_counter()
    result = pull(url, digest, folder, name="bench.gguf", size=size, margin=0)
    seconds = time.perf_counter() - started
    result.path.unlink()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=ROOT / "models" / "bench-glm4-q4_0.gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where pull writes (default: a temporary folder)")
    parser.add_argument("--link-mib-s", type=float, default=None,
                        help="the server's sending rate, emulating the device's link (default: as fast as loopback)")
    args = parser.parse_args()
    if not args.file.is_file():
        raise SystemExit(f"{args.file} does not exist: `make model` builds the bench model")
    size = args.file.stat().st_size
    digest = hashlib.sha256(args.file.read_bytes()).hexdigest()
    gets, pulls = [], []
    urls: multiprocessing.Queue = multiprocessing.Queue()
    rate = args.link_mib_s * 2**20 if args.link_mib_s else None
    server = multiprocessing.Process(target=serve, args=(args.file.parent, rate, urls), daemon=True)
    server.start()
    try:
        url = urls.get(timeout=30) + args.file.name
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            plain_get(url)  # warm-up: the server's first read of the file
            for _ in range(args.rounds):
                gets.append(plain_get(url))
                pulls.append(pulled(url, digest, size, Path(tmp)))
    finally:
        server.terminate()
    get_rate, pull_rate = size / statistics.median(gets) / 2**20, size / statistics.median(pulls) / 2**20
    link = f"server capped at {args.link_mib_s:g} MiB/s" if args.link_mib_s else "loopback, uncapped"
    print(f"file: {args.file.name}, {size / 2**20:.1f} MiB, {link}, {args.rounds} rounds each (medians)")
    print(f"plain GET into /dev/null: {get_rate:8.1f} MiB/s  (rounds: {', '.join(f'{s:.2f} s' for s in gets)})")
    print(f"model_pull (sha256, fsync, rename): {pull_rate:8.1f} MiB/s  "
          f"(rounds: {', '.join(f'{s:.2f} s' for s in pulls)})")
    print(f"ratio pull / GET: {pull_rate / get_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
