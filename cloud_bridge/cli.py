"""`cloud-bridge` command line: parses the arguments and calls service.serve, `commands` (send,
cancel, follow) and `console` (what to print).

Exit codes: 0 success; for `send` 1 when the command ended in another terminal state and 2 when
no terminal reply came before --timeout; 3 for usage, configuration and registry errors (a file the
config names that cannot be opened included; the unit's RestartPreventExitStatus=3); 1 also for an
unexpected failure of `serve` (a lost database), which systemd restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pwd
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from autoglm_wire import __version__
from autoglm_wire.protocol import describe_validation_error, utc_now
from cloud_bridge import artifacts, commands, console, rollout_console, rollouts, stats
from cloud_bridge.config import BridgeConfig, load_config
from cloud_bridge.errors import BridgeError, ConfigError, InvalidRequest
from cloud_bridge.preflight import check_bridge, check_database, check_registry_access
from cloud_bridge.store.access import ROLES
from cloud_bridge.store.devices import MAX_PAGE, DeviceQuery
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import CommandRow, DeviceRow

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_USAGE = 3

DESCRIPTION = """\
Fleet registry, command dispatcher and console of autoglm-edge.

`serve` runs the bridge (MQTT <-> SQLite registry); `check-config` opens every file the config
names as `serve` would, without starting anything; the other subcommands read and write the same
registry file, so run them with the same --config while `serve` is running, as the service user
(`sudo -u cloud-bridge cloud-bridge devices --config /etc/cloud-bridge/cloud-bridge.toml`)."""

SEND_EPILOG = """\
examples:
  cloud-bridge send --config bridge.toml gw-01 ping
  cloud-bridge send --config bridge.toml gw-01 chat "Say hi" --stream --max-tokens 64
  cloud-bridge send --config bridge.toml gw-01 complete "Once upon" --seed 7 --json
  cloud-bridge send --config bridge.toml gw-01 cancel 3f2a...   # PROMPT is the target command id
  cloud-bridge send --config bridge.toml gw-01 config --params '{"temperature": 0.2}' --no-wait

exit codes: 0 succeeded, 1 failed/rejected/expired/cancelled, 2 no terminal reply before --timeout,
3 usage or configuration error"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 3, so that exit 2 of `send` always means a timeout."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"top_p\": 0.9}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cloud-bridge", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cloud-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    common = _Parser(add_help=False)
    common.add_argument("--config", required=True, type=Path, metavar="FILE", help="the bridge's TOML config")

    sub.add_parser("serve", parents=[common], help="run the bridge until SIGTERM/SIGINT",
                   description="Run the bridge: keep the registry, dispatch queued commands, collect replies.")
    sub.add_parser("check-config", parents=[common], help="validate the config and open every file it names",
                   description="Validate the config, open every file it names (TLS, signing key, token, "
                                "credential:NAME) and the registry as `serve` would; print the effective config.")
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    devices = sub.add_parser("devices", parents=[common], help="list devices and their state",
                             description="List the devices that reported to this bridge, by id, with their "
                                         "active and previous model and the rollout that set it (all of them "
                                         "unless --limit; the filters are those of GET /api/devices).")
    devices.add_argument("--state", help="only devices whose last reported state is this (online, offline)")
    devices.add_argument("--group", metavar="G", help="only devices the registry assigns this group (`group add`)")
    devices.add_argument("--model", metavar="M", help="only devices whose active model is M (name or sha256 prefix)")
    devices.add_argument("--match", metavar="TEXT", help="only devices whose id contains TEXT (any case)")
    devices.add_argument("--limit", type=int, metavar="N", help=f"at most N devices (1..{MAX_PAGE})")
    devices.add_argument("--offset", type=int, default=0, metavar="K", help="skip the first K devices")
    _add_send(sub, common)
    commands = sub.add_parser("commands", parents=[common], help="list recent commands",
                              description="List recent commands, newest first.")
    commands.add_argument("--device", metavar="D", help="only this device's commands")
    commands.add_argument("--batch", metavar="B", help="only the commands of this group/filter fan-out")
    commands.add_argument("--limit", type=int, default=20, metavar="N", help="how many (default 20)")
    watch = sub.add_parser("watch", parents=[common], help="follow replies, events and status changes",
                           description="Print replies, events and status changes as they arrive, until Ctrl-C.")
    watch.add_argument("--device", metavar="D", help="only this device")
    watch.add_argument("--for", dest="for_s", type=float, metavar="S", help="stop after S seconds")
    alerts = sub.add_parser("alerts", parents=[common], help="list abnormal-device alerts",
                            description="List open alerts (offline too long, error rate, outbox growing, "
                                        "tokens/s dropping, announced groups differing from the registry's); "
                                        "thresholds are the [alerts] keys.")
    alerts.add_argument("--all", action="store_true", help="also the cleared ones")
    alerts.add_argument("--deliveries", action="store_true",
                        help="the webhook delivery log of alert notifications instead")
    stats_cmd = sub.add_parser("stats", parents=[common], help="latency percentiles and error rate over a window",
                               description="Per device, kind or model: finished generations, device failure rate "
                                           "(failed / (succeeded + failed)) and P50/P95/P99 of queue time, time to "
                                           "first token, total time (ms) and tokens/s, as GET /api/stats.")
    stats_cmd.add_argument("--window", default="1h", metavar="W", help="how far back: 30s, 15m, 1h, 7d (default 1h)")
    stats_cmd.add_argument("--group-by", choices=["device", "kind", "model"], default="device")
    dead = sub.add_parser("dead-letters", parents=[common], help="list messages the bridge could not store",
                          description="List dead letters, newest first: messages from devices that did not follow "
                                      "protocol v1 or could not be stored, with the error. --json gives the exact "
                                      "payload (base64). [retention] dead_letter_days prunes them.")
    dead.add_argument("--device", metavar="D", help="only this device's")
    dead.add_argument("--limit", type=int, default=20, metavar="N", help="how many (default 20)")
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running command",
                            description="Send a `cancel` for a command to its device (priority 1000). A command "
                                        "the device has not accepted yet is closed at once and no longer resent.")
    cancel.add_argument("command_id", metavar="COMMAND_ID")
    policy = sub.add_parser("policy", parents=[common], help="show or push the agent policy",
                            description="Without --set: the policy in force on each device (as its last `config` "
                                        "answer said; `(agent defaults)` until then). With --set: send a `config` "
                                        "command to TARGET (a device or group/G) and wait for each device's answer "
                                        "(the policy now in force). Keys: max_tokens (1-32768, at most the device's "
                                        "limits.max_tokens), temperature (0-5), top_p (0-1], telemetry_interval_s "
                                        "(1-86400); the first three are defaults a command may override.",
                            epilog="example:\n  cloud-bridge policy --config bridge.toml group/site-a "
                                   "--set '{\"temperature\": 0.2, \"max_tokens\": 128}'",
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    policy.add_argument("target", nargs="?", metavar="TARGET", help="a device id or group/G")
    policy.add_argument("--set", dest="policy", type=_json_object, metavar="JSON", help="the partial policy to push")
    policy.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="seconds to wait for each device's answer (default 120); exit 2 when one did not come")
    policy.add_argument("--no-wait", action="store_true", help="print the command ids and return at once")
    _add_group(sub, common)
    _add_access(sub, common)
    _add_models(sub, common)
    return parser


def _add_group(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    group = sub.add_parser("group", help="assign devices to groups (the membership routing and the ACL use)",
                           description="Group membership is the registry's: `group/G` targets, {\"group\": G} "
                                       "filters and /v1 models route by it, and `list --toml` feeds "
                                       "deploy/mosquitto/make_acl.py --groups. What a device announces in its "
                                       "status is only compared with it (alert group_mismatch).")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    for action, text in (("add", "assign DEVICE to GROUP"), ("remove", "take DEVICE out of GROUP")):
        one = actions.add_parser(action, parents=[common], help=text, description=text + ".")
        one.add_argument("device", metavar="DEVICE")
        one.add_argument("group", metavar="GROUP")
    listing = actions.add_parser("list", parents=[common], help="assigned, announced and routed groups per device",
                                 description="Per device: the assigned groups, those its status announces, the "
                                             "groups whose work goes to it, and whether they match.")
    listing.add_argument("--toml", action="store_true", help="print the [groups] table for make_acl.py --groups")
    actions.add_parser("import-claimed", parents=[common], help="assign every device the groups it announces (once)",
                       description="The one-time migration of a fleet from before registry membership: assign "
                                   "every device the groups its last status announced. Review the result with "
                                   "`cloud-bridge group list` before regenerating the ACL.")


def _add_access(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", help="manage the API's named tokens and their roles",
                           description="Named API tokens, each with a role: viewer (reads), operator (also sends "
                                       "and cancels commands, chats through /v1), admin (everything: policy, the "
                                       "audit log). The registry keeps only each token's SHA-256.")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION", parser_class=_Parser)
    add = actions.add_parser("add", parents=[common], help="create a token and print it (once)")
    add.add_argument("name", metavar="NAME", help="who or what uses it (shown in the audit log)")
    add.add_argument("--role", required=True, choices=ROLES)
    actions.add_parser("list", parents=[common], help="name, role, created, last used (never the token)")
    revoke = actions.add_parser("revoke", parents=[common], help="delete a token: it stops working at once")
    revoke.add_argument("name", metavar="NAME")
    audit = sub.add_parser("audit", parents=[common], help="show the audit log of mutating calls",
                           description="Every call that changed something, API and CLI, newest first: who "
                                       "(a token's name or cli:<unix user>), what, on what, when, the outcome.")
    audit.add_argument("--limit", type=int, default=50, metavar="N", help="how many (default 50)")


def _add_models(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    model = sub.add_parser("model", help="register, list and remove model artifacts (GGUF)",
                           description="Model artifacts the bridge deploys: `add` reads a GGUF's header (architecture, "
                                       "quantisation, parameters, context length), hashes it and copies it into "
                                       "[models] dir, served to devices at /artifacts/<sha256> with a download token.")
    actions = model.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    add = actions.add_parser("add", parents=[common], help="register a GGUF file")
    add.add_argument("file", type=Path, metavar="FILE")
    add.add_argument("--name", metavar="N", help="the model's name (default: the file name without .gguf)")
    add.add_argument("--url", metavar="URL", help="devices download it from this mirror instead of the bridge "
                                                  "(the file is hashed, not copied)")
    actions.add_parser("list", parents=[common], help="list registered models")
    remove = actions.add_parser("remove", parents=[common], help="forget a model and delete its copy")
    remove.add_argument("model", metavar="NAME")

    rollout = sub.add_parser("rollout", help="staged model rollouts: create, status, pause, resume, abort, rollback",
                             description="Deploy a registered model to devices in waves; a wave starts when every "
                                         "device of the previous one has reported or timed out; more than "
                                         "--max-failures failed devices halt the rollout and roll back the devices "
                                         "of the halted wave. `cloud-bridge serve` drives it.",
                             epilog="example:\n  cloud-bridge rollout create --config bridge.toml --model glm-q4 "
                                    "--target group/site-a --waves 10%,50%,100% --max-failures 1 --canary canary.json",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = rollout.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    create = actions.add_parser("create", parents=[common], help="start a rollout")
    create.add_argument("--model", required=True, metavar="N", help="a registered model's name or sha256")
    create.add_argument("--target", metavar="T", help="a device id or group/G")
    create.add_argument("--filter", type=_json_object, metavar="JSON",
                        help='instead of --target: e.g. \'{"model_name": "old", "state": "online"}\'')
    create.add_argument("--waves", default="5%,25%,100%", metavar="P1,P2,..",
                        help="cumulative percentages of the devices, the last 100 (default 5%%,25%%,100%%)")
    create.add_argument("--max-failures", type=int, default=0, metavar="K",
                        help="more than K failed devices halt the rollout (default 0)")
    create.add_argument("--canary", type=Path, metavar="FILE", help="a JSON file: the deploy command's canary object")
    create.add_argument("--id", metavar="ID", help="rollout id (default: a fresh one)")
    status = actions.add_parser("status", parents=[common], help="one rollout's devices, or every rollout")
    status.add_argument("rollout_id", nargs="?", metavar="ROLLOUT")
    for name, what in (("pause", "start no new wave"), ("resume", "go on after a pause"),
                       ("abort", "stop; cancel deploys not yet accepted"),
                       ("rollback", "stop, and send a model rollback to every device that activated")):
        actions.add_parser(name, parents=[common], help=what).add_argument("rollout_id", metavar="ROLLOUT")

def _add_send(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    send = sub.add_parser("send", parents=[common], help="queue a command and wait for its reply",
                          description="Queue a command for a device and wait for its terminal reply.",
                          epilog=SEND_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    send.add_argument("device", metavar="DEVICE")
    send.add_argument("kind", metavar="KIND", help="ping, chat, complete, cancel (also onnx, config with --params)")
    send.add_argument("prompt", nargs="?", metavar="PROMPT",
                      help="chat: the user message; complete: the prompt; cancel: the target command id")
    send.add_argument("--stream", action="store_true", help="print the text as the device streams it")
    send.add_argument("--max-tokens", type=int, metavar="N")
    send.add_argument("--temperature", type=float, metavar="T")
    send.add_argument("--seed", type=int, metavar="S")
    send.add_argument("--params", type=_json_object, default={}, metavar="JSON",
                      help="more params, merged last (e.g. '{\"top_p\": 0.9, \"stop\": [\"\\n\"]}')")
    send.add_argument("--timeout", type=float, default=120.0, metavar="S",
                      help="seconds to wait for the terminal reply (default 120); the command stays queued")
    send.add_argument("--expires-in", type=float, metavar="S",
                      help="the command expires S seconds from now (default: dispatch.default_expiry_s)")
    send.add_argument("--id", dest="command_id", metavar="ID", help="command id (default: a fresh uuid4 hex)")
    send.add_argument("--priority", type=int, default=0, metavar="P", help="-1000..1000, higher runs first")
    send.add_argument("--no-wait", action="store_true", help="print the id and return at once")


# --- subcommands ---------------------------------------------------------------------------------


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(f"cloud-bridge: {text}", file=sys.stderr, flush=True)


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        _err(f"warning: {warning}")


def cmd_serve(args: argparse.Namespace, config: BridgeConfig) -> int:
    from cloud_bridge.service import serve

    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for line in check_bridge(config):
        logging.getLogger(__name__).info("config check: %s", line)
    return serve(config)


def cmd_check_config(args: argparse.Namespace, config: BridgeConfig) -> int:
    lines = check_bridge(config)
    if config.store.url is not None:
        lines.append(check_database(config.store))
    effective = config.model_dump(mode="json")
    effective["mqtt"]["tls"] = config.mqtt.uses_tls  # on with a CA file or client certificate too
    _json(effective)
    for line in lines:
        _err(f"ok: {line}")
    return 0


def _json(value: object) -> None:
    _out(json.dumps(value, indent=2, default=_plain))


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = dataclasses.asdict(value)
        data.pop("raw_payload", None)
        return data
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def cmd_devices(args: argparse.Namespace, config: BridgeConfig) -> int:
    if args.limit is not None and not 1 <= args.limit <= MAX_PAGE or args.offset < 0:
        _err(f"--limit must be 1..{MAX_PAGE} and --offset >= 0")
        return EXIT_USAGE
    with _registry(config) as registry:
        rows = _device_pages(registry, args)
        _json(rows) if args.json else _out(console.devices_table(registry, rows))
    return 0


def _device_pages(registry: Registry, args: argparse.Namespace) -> list[DeviceRow]:
    """The devices `args` select: one page with --limit, else every page."""
    query = DeviceQuery(args.state, args.group, args.model, args.match, args.limit or MAX_PAGE, args.offset)
    rows, total = registry.devices.page(query)
    while args.limit is None and rows and args.offset + len(rows) < total:
        rows += registry.devices.page(dataclasses.replace(query, offset=args.offset + len(rows)))[0]
    return rows


def cmd_model(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.action == "add":
            with _audited(registry, "model add", args.name or args.file.name):
                model, added = artifacts.register(registry, config.models.dir, args.file, args.name, args.url)
            if not args.json:
                _out(f"{'registered' if added else 'already registered:'} {model.name} {model.sha256} "
                     f"({model.size} bytes, {model.architecture} {model.quantization})")
                return 0
            _json(model)
        elif args.action == "list":
            models = registry.models.all()
            _json(models) if args.json else _out(rollout_console.models_table(models))
        else:
            with _audited(registry, "model remove", args.model):
                model = artifacts.unregister(registry, config.models.dir, args.model)
            _json(model) if args.json else _out(f"removed {model.name} {model.sha256}")
    return 0


def cmd_rollout(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.action == "create":
            with _audited(registry, "rollout create", args.target or "filter"):
                rollout_id = rollouts.create(registry, config, _rollout_request(args)).id
        elif args.action == "status" and args.rollout_id is None:
            _json(registry.rollouts.recent()) if args.json else _out(rollout_console.rollouts_table(registry))
            return 0
        else:
            rollout_id = args.rollout_id
            actions = {"pause": rollouts.pause, "resume": rollouts.resume, "abort": rollouts.abort,
                       "rollback": rollouts.rollback}
            if args.action in actions:
                with _audited(registry, f"rollout {args.action}", rollout_id):
                    actions[args.action](registry, rollout_id)
        _json(rollouts.status(registry, rollout_id)) if args.json else _out(
            rollout_console.rollout_text(registry, rollout_id))
    return 0


def _rollout_request(args: argparse.Namespace) -> rollouts.RolloutRequest:
    canary = None
    if args.canary is not None:
        try:
            canary = rollouts.parse_canary(json.loads(args.canary.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"--canary {args.canary}: {exc}; give a JSON file holding the canary object") from exc
    try:
        return rollouts.RolloutRequest(model=args.model, target=args.target, max_failures=args.max_failures,
                                       filter=args.filter, waves=rollouts.parse_waves(args.waves), canary=canary,
                                       id=args.id)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from exc


def cmd_commands(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.json:
            _json(registry.commands.recent(args.device, args.limit, args.batch))
        else:
            _out(console.commands_table(registry, args.device, args.limit, args.batch))
    return 0


def cmd_alerts(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.deliveries:
            _json(registry.deliveries.recent()) if args.json else _out(console.deliveries_table(registry))
        elif args.json:
            _json(registry.alerts.recent(open_only=not args.all))
        else:
            _out(console.alerts_table(registry, args.all))
    return 0


def cmd_stats(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        result = stats.fleet_stats(registry, args.window, args.group_by, utc_now())
    if args.json:
        _json(result.model_dump(mode="json"))
    else:
        _out(stats.stats_table(result))
    return 0


def cmd_dead_letters(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.json:
            _json([row.as_json() for row in registry.dead_letters.recent(args.device, args.limit)])
        else:
            _out(console.dead_letters_table(registry, args.device, args.limit))
    return 0


def cmd_cancel(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        with _audited(registry, "cancel", args.command_id):
            row, warnings = commands.cancel(registry, args.command_id, dispatch=config.dispatch)
        _warn(warnings)
        _json({"cancel": row, "target": registry.commands.get(args.command_id)}) if args.json else _out(row.id)
    return 0


def cmd_policy(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.policy is None:
            _json({d.device_id: d.policy for d in registry.devices.all()}) if args.json else _out(
                console.policies_table(registry))
            return 0
        if args.target is None:
            raise InvalidRequest("--set needs a TARGET: a device id or group/G")
        request = commands.CommandRequest(target=args.target, kind="config", params=args.policy)
        with _audited(registry, "policy --set", args.target):
            queued = commands.send(registry, request, dispatch=config.dispatch)
        _warn(queued.warnings)
        if args.no_wait:
            _json(queued.rows) if args.json else _out("\n".join(row.id for row in queued.rows))
            return 0
        finals = [commands.Follower(registry, row.id).wait(args.timeout) for row in queued.rows]
    for row in finals:
        if args.json:
            continue
        if row.state == "succeeded":
            _out(f"{row.device_id}: policy in force {json.dumps((row.reply or {}).get('output'), sort_keys=True)}")
        else:
            _err(console.describe_failure(row))
    if args.json:
        _json([console.final_json(row) for row in finals])
    return max(exit_code(row) for row in finals)


def cmd_group(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.action == "list":
            if args.toml:
                _out(console.groups_toml(registry).rstrip("\n"))
            elif args.json:
                _json({d.device_id: {"assigned": d.groups, "announced": d.claimed_groups, "routed": d.routable_groups}
                       for d in registry.devices.all() if d.groups or d.claimed_groups})
            else:
                _out(console.groups_table(registry))
        elif args.action == "import-claimed":
            with _audited(registry, "group import-claimed", "*"):
                added, skipped = registry.groups.import_claimed()
            for device_id, group in added:
                _out(f"{device_id}: assigned {group}")
            for device_id, group in skipped:
                _err(f"{device_id}: announces {group!r}, which is not a valid group name; not assigned")
            _out(f"{len(added)} assignment(s) imported; check them with `cloud-bridge group list`")
        else:
            with _audited(registry, f"group {args.action}", f"group/{args.group} {args.device}"):
                _group_change(registry, args)
    return 0


def _group_change(registry: Registry, args: argparse.Namespace) -> None:
    if args.action == "add":
        try:
            changed = registry.groups.add(args.device, args.group)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        _out(f"{args.device}: assigned {args.group}" if changed else f"{args.device} already is in {args.group}")
    elif registry.groups.remove(args.device, args.group):
        _out(f"{args.device}: removed from {args.group}")
    else:
        raise InvalidRequest(f"{args.device} is not assigned {args.group}; see `cloud-bridge group list`")
    _err("regenerate the broker ACL (group list --toml | make_acl.py --groups) so its subscriptions follow")


def cmd_token(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        if args.token_command == "list":
            _json(registry.tokens.all()) if args.json else _out(console.tokens_table(registry))
            return 0
        with _audited(registry, f"token {args.token_command}", args.name):
            if args.token_command == "revoke":
                registry.tokens.revoke(args.name)
                return 0
            token = registry.tokens.add(args.name, args.role)
    _err(f"token {args.name!r} ({args.role}); it is shown only this once, store it now:")
    _out(token)
    return 0


def cmd_audit(args: argparse.Namespace, config: BridgeConfig) -> int:
    with _registry(config) as registry:
        _json(registry.audit.recent(args.limit)) if args.json else _out(console.audit_table(registry, args.limit))
    return 0


def cli_actor() -> str:
    """`cli:<unix user>` of this process (its effective uid, not $USER)."""
    try:
        return f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f"cli:uid {os.geteuid()}"


@contextmanager
def _audited(registry: Registry, action: str, target: str | None) -> Iterator[None]:
    """Record the block in the audit log: `ok`, or the error it raised (then re-raised)."""
    try:
        yield
    except Exception as exc:
        registry.audit.record(cli_actor(), action, target or "", f"error: {exc}")
        raise
    registry.audit.record(cli_actor(), action, target or "", "ok")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_watch(args: argparse.Namespace, config: BridgeConfig) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    with _registry(config) as registry:
        try:
            console.watch(registry, _out, args.device, args.for_s, on_ready=lambda: _err(
                f"watching {registry.path}" + (f" for {args.device}" if args.device else "") + "; Ctrl-C to stop"),
                as_json=args.json)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_send(args: argparse.Namespace, config: BridgeConfig) -> int:
    # argparse typed every value; commands.build_command checks the ranges with the messages of `send`
    request = commands.CommandRequest.model_construct(
        target=args.device, kind=args.kind, prompt=args.prompt, stream=args.stream, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, params=args.params, expires_in_s=args.expires_in,
        id=args.command_id, priority=args.priority,
    )
    with _registry(config) as registry:
        with _audited(registry, f"send {args.kind}", args.device):
            queued = commands.send(registry, request, dispatch=config.dispatch)
        _warn(queued.warnings)
        if args.no_wait or len(queued.rows) > 1:
            _json(queued.rows) if args.json else _out("\n".join(row.id for row in queued.rows))
            return 0
        return _wait_and_print(registry, queued.rows[0].id, args)


def _wait_and_print(registry: Registry, command_id: str, args: argparse.Namespace) -> int:
    printing = args.stream and not args.json
    follower = commands.Follower(registry, command_id)
    try:
        for delta in follower.follow(args.timeout):
            if printing:
                print(delta, end="", flush=True)
        row = follower.row
    except KeyboardInterrupt:
        row = registry.commands.get(command_id)
    if args.json:
        _out(json.dumps(console.final_json(row) if row.terminal else _progress(row), indent=2))
    elif row.state == "succeeded":
        _out(console.format_outcome(row, follower.text if printing else None, follower.gaps))
    if row.state != "succeeded":
        _err(console.describe_failure(row))
    return exit_code(row)


def exit_code(row: CommandRow) -> int:
    """0 succeeded, 1 any other terminal state, 2 not finished (timeout)."""
    if not row.terminal:
        return EXIT_TIMEOUT
    return EXIT_SUCCEEDED if row.state == "succeeded" else EXIT_FAILED


def _progress(row: CommandRow) -> dict:
    return {"command_id": row.id, "device_id": row.device_id, "status": row.state, "attempts": row.attempts}


@contextmanager
def _registry(config: BridgeConfig) -> Iterator[Registry]:
    """Open the registry read/write without creating it (a console never creates an orphan file)."""
    check_registry_access(config.store)
    registry = Registry.from_config(config.store, create=False)
    try:
        yield registry
    finally:
        registry.close()


HANDLERS: dict[str, Callable[[argparse.Namespace, BridgeConfig], int]] = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "devices": cmd_devices,
    "send": cmd_send,
    "commands": cmd_commands,
    "watch": cmd_watch,
    "alerts": cmd_alerts,
    "dead-letters": cmd_dead_letters,
    "stats": cmd_stats,
    "cancel": cmd_cancel,
    "policy": cmd_policy,
    "group": cmd_group,
    "token": cmd_token,
    "audit": cmd_audit,
    "model": cmd_model,
    "rollout": cmd_rollout,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        return HANDLERS[args.command](args, config)
    except (BridgeError, ConfigError) as exc:
        _err(f"error: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
