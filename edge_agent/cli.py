"""`edge-agent` command line: a thin adapter over the library.

Examples:
  edge-agent run --config /etc/edge-agent/edge-agent.toml
  edge-agent check-config /etc/edge-agent/edge-agent.toml
  edge-agent tune --model glm.gguf --target tokens_per_s --max-latency-ms 500 --budget-s 300 --out profile.toml
  EDGE_AGENT_MQTT__HOST=broker.lan edge-agent check-config edge-agent.toml
  edge-agent model pull https://mirror.lan/glm-edge-1.5b-q4_0.gguf --sha256 HEX --config /etc/edge-agent/edge-agent.toml
  edge-agent model list --config /etc/edge-agent/edge-agent.toml

`run` and `check-config` open every file the config names (TLS files, trusted keys, password,
`credential:NAME`, the model, the store's folder) as this user before anything heavy.

exit codes: 0 success (a clean stop after SIGTERM); 1 a protocol error; 2 the config or a file it
names is wrong (the unit's RestartPreventExitStatus=2: systemd does not restart a broken config);
3 a model download failed (the message says whether the partial file was kept for a resume)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from autoglm_wire import __version__
from autoglm_wire.errors import ConfigError, ProtocolError
from edge_agent.config import AgentConfig, load_config
from edge_agent.model_pull import Progress, PullError, pull
from edge_agent.model_slots import read_slots, slot_rows
from edge_agent.preflight import check_agent

EXIT_PROTOCOL = 1
EXIT_CONFIG = 2
EXIT_DOWNLOAD = 3


def _llama_engine(config: AgentConfig):  # noqa: ANN202 - imported lazily: llama.cpp is heavy
    from edge_agent.engine.llama import LlamaEngine

    return LlamaEngine(config.model, config.templates, config.limits.max_generation_s)


def _resolved(config: AgentConfig) -> AgentConfig:
    """`model.parallel = "auto"` replaced by the number it picks (the executor starts that many workers)."""
    from edge_agent.engine.llama import resolve_parallel

    return config.model_copy(update={"model": resolve_parallel(config.model)})


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    config = load_config(Path(args.config))
    logging.getLogger().setLevel(config.log_level.upper())
    for line in check_agent(config):  # before the model is loaded: a bad file fails in a second
        logging.getLogger(__name__).info("config check: %s", line)
    reload = lambda: _resolved(load_config(Path(args.config)))  # noqa: E731 - SIGHUP re-reads the file
    return Agent(_resolved(config), _llama_engine, reload_config=reload).run()


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file))
    lines = check_agent(config)
    effective = config.model_dump(mode="json")
    effective["mqtt"]["tls"] = config.mqtt.uses_tls  # on with a CA file or client certificate too
    print(json.dumps(effective, indent=2))
    for line in lines:
        print(f"ok: {line}", file=sys.stderr)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from edge_agent.tune import run_tune

    return run_tune(Path(args.model), args.target, args.max_latency_ms, args.budget_s, Path(args.out),
                    n_ctx=args.n_ctx, max_tokens=args.max_tokens)


def _model_pull(args: argparse.Namespace) -> int:
    if args.config:
        models = load_config(Path(args.config)).models
        folder: Path = models.dir or Path("models")  # load_config always sets it
        ca_file, attempts = args.ca_file or models.ca_file, models.download_attempts
    elif args.dir:
        folder, ca_file, attempts = Path(args.dir), args.ca_file, 8
    else:
        raise ConfigError("model pull needs --config FILE (its [models] dir) or --dir FOLDER")
    try:
        result = pull(args.url, args.sha256, folder, name=args.name, size=args.size, ca_file=ca_file,
                      on_progress=_progress_bar, attempts=attempts)
    except PullError as exc:
        print(f"\nedge-agent: {exc}", file=sys.stderr)
        return EXIT_DOWNLOAD
    verb = "already present" if result.already_present else f"downloaded in {result.seconds:.1f} s"
    print(f"\n{result.path}: {result.size} bytes, sha256 {result.sha256} ({verb})", file=sys.stderr)
    return 0


def _model_list(args: argparse.Namespace) -> int:
    """The model slots recorded in the agent's store: the active one first, then the previous ones."""
    rows = slot_rows(read_slots(load_config(Path(args.config)).store.path))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no model slot recorded yet: the agent records its [model] path at its first start", file=sys.stderr)
        return 0
    for row in rows:
        when = datetime.fromtimestamp(row["activated_at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{row['role']:<8}  {row['name']:<32}  {row['sha256'][:16]}  {row['size']:>12}  {when}  {row['path']}")
    return 0


def _progress_bar(progress: Progress) -> None:
    mib = progress.done / 2**20
    rate = f"{progress.bytes_per_s / 2**20:6.1f} MiB/s"
    if progress.total:
        filled = int(30 * progress.done / progress.total)
        bar = "#" * filled + "." * (30 - filled)
        line = f"[{bar}] {progress.percent:5.1f}% {mib:8.1f}/{progress.total / 2**20:.1f} MiB"
    else:
        line = f"{mib:8.1f} MiB"
    print(f"\r{line} {rate}", end="", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve commands over MQTT until SIGTERM")
    run.add_argument("--config", required=True, help="TOML config file (see systemd/edge-agent.toml)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config",
                           help="validate a config, open every file it names, print the effective config")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    tune = sub.add_parser("tune", help="benchmark llama.cpp settings for a model and write the best as a profile")
    tune.add_argument("--model", required=True, help="the GGUF file to tune for")
    tune.add_argument("--target", choices=["tokens_per_s", "ttft"], default="tokens_per_s",
                      help="what to maximize: decode speed, or (lowest) time to first token")
    tune.add_argument("--max-latency-ms", type=float, default=None,
                      help="only accept settings whose time to first token on the benchmark prompt is within this")
    tune.add_argument("--budget-s", type=float, default=300.0, help="stop starting trials after this (default 300)")
    tune.add_argument("--out", default="profile.toml", help="profile to write (default profile.toml)")
    tune.add_argument("--n-ctx", type=int, default=2048, help="context size to tune with (default 2048)")
    tune.add_argument("--max-tokens", type=int, default=32, help="tokens decoded per trial (default 32)")
    tune.set_defaults(func=_tune)
    model = sub.add_parser("model", help="manage the downloaded models").add_subparsers(dest="action", required=True)
    fetch = model.add_parser("pull", help="download a GGUF, resumable, verified by its sha256 before it can be used")
    fetch.add_argument("url", help="http(s) URL of the file")
    fetch.add_argument("--sha256", required=True, help="the expected sha256 (64 hex digits): `sha256sum FILE`")
    fetch.add_argument("--size", type=int, default=None, help="the expected size in bytes (checked before the body)")
    fetch.add_argument("--name", default=None, help="file name in the models folder (default: the URL's)")
    fetch.add_argument("--config", default=None, help="the agent's config: downloads go to its [models] dir")
    fetch.add_argument("--dir", default=None, help="the models folder, without a config")
    fetch.add_argument("--ca-file", type=Path, default=None, help="CA of the server (default: [models] ca_file, "
                       "then the system's CAs)")
    fetch.set_defaults(func=_model_pull)
    listing = model.add_parser("list", help="the model slots in the agent's store (active, then previous)")
    listing.add_argument("--config", required=True, help="the agent's config (its [store] path)")
    listing.add_argument("--json", action="store_true", help="print the slots as JSON")
    listing.set_defaults(func=_model_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ProtocolError as exc:
        print(f"edge-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_PROTOCOL


if __name__ == "__main__":
    sys.exit(main())
