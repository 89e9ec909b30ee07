#!/usr/bin/env python3
"""Render the mosquitto ACL of a fleet from deploy/mosquitto/acl.template.

Usage:
  cloud-bridge group list --config bridge.toml --toml > groups.toml
  python3 deploy/mosquitto/make_acl.py fleet.toml --groups groups.toml > /etc/mosquitto/autoglm.acl

Group membership is assigned in the bridge's registry (`cloud-bridge group add|remove`); `--groups`
takes the `[groups]` table from its export, which replaces any `[groups]` in fleet.toml. Reload
mosquitto (SIGHUP) after writing the ACL.

fleet.toml (every key optional):
  prefix = "autoglm"            # mqtt.topic_prefix of the agents and the bridge
  bridge_users = ["cloud-bridge-1", "cloud-bridge-2"]  # CN of each bridge replica's certificate
                                # (default ["cloud-bridge"]; `bridge_user = "..."` names just one)
  [groups]                      # group -> the gateways (device ids) in it; without --groups only
  site-a = ["gw-01", "gw-02"]   # (a fleet that does not use groups, or a test)

Standard library only, so it runs on the broker host without the project installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

TEMPLATE = Path(__file__).with_name("acl.template")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # device ids and groups (protocol v1)
PREFIX = re.compile(r"^[^+#/\0][^+#\0]*(?<!/)$")
BRIDGE_BLOCK = re.compile(r"^user @BRIDGE_USER@\n(?:topic .*\n)+", re.MULTILINE)  # repeated per bridge user


class FleetError(ValueError):
    """The fleet file is invalid; the message names the entry."""


def _check(kind: str, value: object, pattern: re.Pattern[str] = NAME) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise FleetError(f"{kind} {value!r} is not valid: use 1-64 characters of [A-Za-z0-9_.-]")
    return value


def render(fleet: dict[str, object], template: str) -> str:
    """The ACL text for a parsed fleet file."""
    prefix = _check("prefix", fleet.get("prefix", "autoglm"), PREFIX)
    bridges = fleet.get("bridge_users", [fleet.get("bridge_user", "cloud-bridge")])
    if not isinstance(bridges, list) or not bridges:
        raise FleetError("bridge_users must list the CN of each bridge replica's certificate")
    bridges = [_check("bridge user", bridge) for bridge in bridges]
    groups = fleet.get("groups", {})
    if not isinstance(groups, dict):
        raise FleetError("[groups] must be a table of group = [device ids]")
    members: dict[str, list[str]] = {}
    for group, devices in sorted(groups.items()):
        _check("group", group)
        if not isinstance(devices, list):
            raise FleetError(f"group {group!r} must list device ids")
        for device in devices:
            if _check("device id", device) in (*bridges, "group"):
                raise FleetError(f"device id {device!r} is reserved (the bridge's user or the group tree)")
            members.setdefault(device, []).append(group)
    blocks = [f"user {device}\n" + "".join(f"topic read {prefix}/group/{g}/cmd\n" for g in device_groups)
              for device, device_groups in sorted(members.items())]
    bridge_block = BRIDGE_BLOCK.search(template)
    if bridge_block is None:
        raise FleetError(f"{TEMPLATE} has no `user @BRIDGE_USER@` block")
    rights = bridge_block.group(0)
    template = template.replace(rights, "\n".join(rights.replace("@BRIDGE_USER@", b) for b in bridges))
    return template.replace("@PREFIX@", prefix).replace("@GROUPS@\n", "\n".join(blocks) or "# (no groups)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fleet", type=Path, help="fleet TOML file (prefix, bridge users)")
    parser.add_argument("--groups", type=Path, metavar="FILE",
                        help="the [groups] table from `cloud-bridge group list --toml` (the registry's membership)")
    args = parser.parse_args(argv)
    try:
        fleet = tomllib.loads(args.fleet.read_text(encoding="utf-8"))
        if args.groups is not None:
            fleet["groups"] = tomllib.loads(args.groups.read_text(encoding="utf-8")).get("groups", {})
        sys.stdout.write(render(fleet, TEMPLATE.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, FleetError) as exc:
        print(f"make_acl: {args.fleet}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
