"""`edge-agent` command line: a thin adapter over the library.

Examples:
  edge-agent run --config /etc/edge-agent/edge-agent.toml
  edge-agent check-config /etc/edge-agent/edge-agent.toml
  EDGE_AGENT_MQTT__HOST=broker.lan edge-agent check-config edge-agent.toml
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import AgentError, ConfigError


def _llama_engine(config: AgentConfig):  # noqa: ANN202 - imported lazily: llama.cpp is heavy
    from edge_agent.engine.llama import LlamaEngine

    return LlamaEngine(config.model)


def _run(args: argparse.Namespace) -> int:
    from edge_agent.agent import Agent

    config = load_config(Path(args.config))
    logging.getLogger().setLevel(config.log_level.upper())
    return Agent(config, _llama_engine).run()


def _check_config(args: argparse.Namespace) -> int:
    config = load_config(Path(args.file))
    print(config.model_dump_json(indent=2))
    if not config.model.path.is_file():
        print(f"warning: model file {config.model.path} does not exist yet", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve commands over MQTT until SIGTERM")
    run.add_argument("--config", required=True, help="TOML config file (see systemd/edge-agent.toml)")
    run.set_defaults(func=_run)
    check = sub.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("file")
    check.set_defaults(func=_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"edge-agent: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
