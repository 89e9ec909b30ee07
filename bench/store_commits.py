"""What the store costs per command, with `synchronous` FULL and NORMAL: the intake commit of
an early start (`SqliteInbox.accept(claim=True)`: `accepted` and `running` with both replies, no
fsync of its own), the `SqliteFile.sync()` the link runs before the PUBACK (one fsync of the WAL, FULL only),
and the terminal reply's commit (fsynced itself under FULL). Baseline: raw SQLite, one INSERT
of the same command into a bare table and its commit, same file settings.

  python bench/store_commits.py                 # 60 commands each, in a temporary folder
  python bench/store_commits.py --backlog 90000    # behind 90,000 unsent rows (a long outage; the cap is 100,000)
  python bench/store_commits.py --dir /var/lib/edge-agent --commands 200   # on the device's disk
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autoglm_wire.lifecycle import State  # noqa: E402
from autoglm_wire.topics import DeviceTopics  # noqa: E402
from edge_agent.inbox import SqliteInbox  # noqa: E402
from edge_agent.outbox import ReplyDraft, SqliteOutbox  # noqa: E402
from edge_agent.sqlite_file import SqliteFile  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000.0


def fill_outbox(file: SqliteFile, topics: DeviceTopics, rows: int) -> None:
    """`rows` unsent 600-byte replies, as an outage leaves them (one transaction, to be quick)."""
    with file.db.atomic():
        file.db.conn.executemany(
            "INSERT INTO outbox (topic, payload, qos, bytes, created_at) VALUES (?, ?, 1, 600, 0)",
            ((topics.reply, b"x" * 600) for _ in range(rows)))


def raw_commit_s(path: Path, synchronous: str, commands: int) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("CREATE TABLE commands (id TEXT PRIMARY KEY, payload TEXT NOT NULL)")
    samples = []
    for i in range(commands):
        started = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("INSERT INTO commands VALUES (?, ?)", (f"c{i}", '{"prompt": "x"}'))
        conn.execute("COMMIT")
        samples.append(time.perf_counter() - started)
    conn.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the store (default: a temporary one)")
    parser.add_argument("--commands", type=int, default=60)
    parser.add_argument("--backlog", type=int, default=0, help="unsent rows in the outbox before the commands")
    args = parser.parse_args()
    for synchronous in ("full", "normal"):
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            topics = DeviceTopics("autoglm", "bench")
            file = SqliteFile(Path(folder) / "bench.db", synchronous)
            inbox = SqliteInbox(file, SqliteOutbox(file, topics))
            fill_outbox(file, topics, args.backlog)
            intake, sync, terminal = [], [], []
            for i in range(args.commands):
                started = time.perf_counter()
                inbox.accept(f"c{i}", "complete", '{"prompt": "x"}', 0, None, claim=True)
                intake.append(time.perf_counter() - started)
                started = time.perf_counter()
                file.sync()
                sync.append(time.perf_counter() - started)
                started = time.perf_counter()
                inbox.transition(f"c{i}", State.SUCCEEDED, ReplyDraft(status="succeeded"))
                terminal.append(time.perf_counter() - started)
            file.close()
            raw = raw_commit_s(Path(folder) / "raw.db", synchronous, args.commands)
        print(f"synchronous={synchronous:<6}  intake commit {median_ms(intake):5.2f} ms   "
              f"sync {median_ms(sync):5.2f} ms   terminal reply commit {median_ms(terminal):5.2f} ms   "
              f"raw INSERT commit {median_ms(raw):5.2f} ms   intake/raw x{median_ms(intake) / median_ms(raw):.2f}   "
              f"(medians of {args.commands}, {args.backlog} rows waiting)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
