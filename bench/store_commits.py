"""What the store costs per command, with `synchronous` FULL and NORMAL: the intake commit of
an early start (`Store.accept(claim=True)`: `accepted` and `running` with both replies, no fsync
of its own), the `Store.sync()` the link runs before the PUBACK (one fsync of the WAL, FULL only),
and the terminal reply's commit (fsynced itself under FULL).

  python bench/store_commits.py                 # 60 commands each, in a temporary folder
  python bench/store_commits.py --dir /var/lib/edge-agent --commands 200   # on the device's disk
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.lifecycle import State  # noqa: E402
from edge_agent.store import ReplyDraft, Store  # noqa: E402
from edge_agent.topics import DeviceTopics  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the store (default: a temporary one)")
    parser.add_argument("--commands", type=int, default=60)
    args = parser.parse_args()
    for synchronous in ("full", "normal"):
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            store = Store(Path(folder) / "bench.db", DeviceTopics("autoglm", "bench"), synchronous)
            intake, sync, terminal = [], [], []
            for i in range(args.commands):
                started = time.perf_counter()
                store.accept(f"c{i}", "complete", '{"prompt": "x"}', 0, None, claim=True)
                intake.append(time.perf_counter() - started)
                started = time.perf_counter()
                store.sync()
                sync.append(time.perf_counter() - started)
                started = time.perf_counter()
                store.transition(f"c{i}", State.SUCCEEDED, ReplyDraft(status="succeeded"))
                terminal.append(time.perf_counter() - started)
            store.close()
        print(f"synchronous={synchronous:<6}  intake commit {median_ms(intake):5.2f} ms   "
              f"sync {median_ms(sync):5.2f} ms   terminal reply commit {median_ms(terminal):5.2f} ms   "
              f"(medians of {args.commands})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
