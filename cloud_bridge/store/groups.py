"""Group membership as the cloud assigns it (`device_groups`): the only membership that routing
(`group/G` targets, `{"group": G}` filters, `/v1` models) and the broker ACL use. What a device
announces in its Status is kept beside it (`devices.claimed_groups`) and only compared with it."""

from __future__ import annotations

from datetime import datetime

from autoglm_wire.topics import check_device_id, check_group
from cloud_bridge.store.connection import Connection
from cloud_bridge.store.devices import Devices
from cloud_bridge.store.rows import stamp


class Groups:
    def __init__(self, connection: Connection, devices: Devices) -> None:
        self._db = connection
        self._devices = devices

    def add(self, device_id: str, group: str, now: datetime | None = None) -> bool:
        """Assign `device_id` to `group` (the device is listed from now on, even before it reports).
        True when it was not a member yet. Raises ValueError for an id or group protocol v1 refuses."""
        check_device_id(device_id)
        check_group(group)
        with self._db.transaction():
            self._devices.ensure(device_id, None)
            return self._db.execute(
                "INSERT INTO device_groups (device_id, group_name, assigned_at) VALUES (?, ?, ?) "
                "ON CONFLICT (device_id, group_name) DO NOTHING", (device_id, group, stamp(now))) == 1

    def remove(self, device_id: str, group: str) -> bool:
        """Take `device_id` out of `group`; True when it was a member."""
        return self._db.execute("DELETE FROM device_groups WHERE device_id = ? AND group_name = ?",
                                (device_id, group)) == 1

    def members(self) -> dict[str, list[str]]:
        """Every group with its assigned devices, both sorted."""
        rows = self._db.query("SELECT group_name, device_id FROM device_groups ORDER BY group_name, device_id")
        groups: dict[str, list[str]] = {}
        for row in rows:
            groups.setdefault(row["group_name"], []).append(row["device_id"])
        return groups

    def import_claimed(self, now: datetime | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """Assign every device the groups its last Status announced (the one-time migration of a
        fleet whose membership used to be what devices claimed). Returns the (device, group) pairs
        newly assigned and those skipped because the name is not a valid group."""
        added, skipped = [], []
        with self._db.transaction():
            for device in self._devices.all():
                for group in device.claimed_groups:
                    try:
                        if self.add(device.device_id, group, now):
                            added.append((device.device_id, group))
                    except ValueError:
                        skipped.append((device.device_id, group))
        return added, skipped
