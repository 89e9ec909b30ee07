"""The bridge end to end: its own mosquitto, `cloud-bridge serve` as a subprocess, a fake device."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from datetime import UTC, datetime

import pytest

from autoglm_wire.protocol import Event, format_ts, utc_now
from cloud_bridge.store.registry import Registry

from .conftest import VENV_BIN, BridgeProcess, launch_bridge, stop_process, wait_until, write_bridge_config
from .fake_device import FakeDevice, stay_silent

pytestmark = pytest.mark.integration


@pytest.fixture
def open_registry(bridge: BridgeProcess):
    registry = Registry.open(bridge.registry_path, create=False)
    yield registry
    registry.close()


@pytest.fixture
def device(bridge: BridgeProcess, mosquitto):
    dev = FakeDevice(mosquitto.port, bridge.prefix, "dev-1").start()
    yield dev
    dev.stop()


def _device_online(registry: Registry, device_id: str) -> bool:
    row = registry.devices.get(device_id)
    return row is not None and row.state == "online"


def test_a_device_that_publishes_its_status_is_listed_online(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online in the registry")
    out = bridge.cli("devices")
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("dev-1"))
    assert "online" in line and "fake-glm" in line and "cdcdcdcdcdcd" in line and "0.0-test" in line


def test_send_ping_exits_0_prints_pong_and_stores_each_reply_once(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    out = bridge.cli("send", "dev-1", "ping", "--id", "ping-1", "--timeout", "15")
    assert out.returncode == 0, f"stdout:\n{out.stdout}\nstderr:\n{out.stderr}\nbridge:\n{bridge.log()}"
    assert "pong" in out.stdout
    row = open_registry.commands.get("ping-1")
    assert row.state == "succeeded" and row.attempts >= 1
    wait_until(lambda: open_registry.counters.all().get("duplicate_replies"), what="the duplicate reply to be seen")
    assert [r.status for r in open_registry.replies.of_command("ping-1")] == ["accepted", "succeeded"]
    assert [c["id"] for c in device.received] == ["ping-1"]
    assert device.received[0]["target"] == "dev-1"


def test_send_json_prints_the_terminal_reply(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    out = bridge.cli("send", "dev-1", "complete", "Once", "--max-tokens", "4", "--json", "--timeout", "15")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["status"] == "succeeded" and reply["output"]["text"] == "Hello!"
    assert device.received[0]["params"] == {"prompt": "Once", "max_tokens": 4}


def test_send_stream_prints_the_deltas_then_the_summary(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    out = bridge.cli("send", "dev-1", "chat", "hi", "--stream", "--id", "chat-1", "--timeout", "15")
    assert out.returncode == 0, out.stderr
    assert [c.delta for c in open_registry.chunks.of_command("chat-1")] == ["Hel", "lo", "!"]
    assert device.received[0]["params"]["stream"] is True
    assert "Hello!" in out.stdout and "finish_reason=stop" in out.stdout and "tokens/s=42.0" in out.stdout


def test_a_device_that_never_accepts_gets_the_same_id_again(bridge, mosquitto, open_registry):
    silent = FakeDevice(mosquitto.port, bridge.prefix, "dev-silent", behaviour=stay_silent).start()
    try:
        wait_until(lambda: _device_online(open_registry, "dev-silent"), what="dev-silent online")
        out = bridge.cli("send", "dev-silent", "ping", "--id", "again-1", "--no-wait")
        assert out.returncode == 0 and out.stdout.strip() == "again-1", out.stderr
        wait_until(lambda: len(silent.received) >= 2, timeout_s=15, what="a resend")
        assert {c["id"] for c in silent.received} == {"again-1"}
        # the dispatch loop publishes a chunk's sends before it commits their claim: the device may
        # hold the resend a moment before the registry shows the second attempt
        wait_until(lambda: open_registry.commands.get("again-1").attempts >= 2, what="the resend counted")
        silent.reply("again-1", "accepted")
        wait_until(lambda: open_registry.commands.get("again-1").state == "accepted", what="accepted")
    finally:
        silent.stop()


def test_a_command_nobody_accepts_before_it_expires_ends_expired(bridge, open_registry):
    out = bridge.cli("send", "ghost", "ping", "--id", "exp-1", "--expires-in", "1", "--timeout", "15")
    assert out.returncode == 1, f"{out.stdout}\n{out.stderr}"
    assert "never reported status" in out.stderr and "ended expired: expired" in out.stderr
    row = open_registry.commands.get("exp-1")
    assert row.state == "expired" and row.error["code"] == "expired"
    listing = bridge.cli("commands", "--device", "ghost")
    assert "exp-1" in listing.stdout and "expired" in listing.stdout


def test_send_times_out_with_exit_2_and_the_command_stays_queued(bridge, open_registry):
    out = bridge.cli("send", "ghost", "ping", "--id", "slow-1", "--timeout", "1")
    assert out.returncode == 2 and "stays queued" in out.stderr
    assert open_registry.commands.get("slow-1").state in ("pending", "sent")


def test_watch_prints_replies_events_and_status_changes(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    watch = subprocess.Popen([str(VENV_BIN / "cloud-bridge"), "watch", "--config", str(bridge.config_path),
                              "--for", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(watch.stdout), daemon=True)
    try:
        assert "watching" in watch.stderr.readline()
        reader.start()
        device.reply("unknown-cmd", "accepted")
        device.event("disk_low", "5% free")
        device.go_offline()
        expected = ["reply  dev-1 #1 unknown-cmd accepted", "event  dev-1 warning disk_low: 5% free",
                    "status dev-1 offline"]
        wait_until(lambda: all(any(e in line for line in lines) for e in expected), timeout_s=15,
                   what=f"watch to print {expected}")
    finally:
        assert stop_process(watch) == 0


def test_bad_payloads_are_dead_lettered_listed_and_the_bridge_keeps_working(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    device.publish(device.topics.reply, b"{not json")
    device.publish(device.topics.telemetry, b'{"v": 1}', qos=0)
    wait_until(lambda: open_registry.counters.all().get("dead_letters", 0) >= 1, what="a bad payload dead-lettered")
    out = bridge.cli("send", "dev-1", "ping", "--timeout", "15")
    assert out.returncode == 0, out.stderr
    assert bridge.process.poll() is None
    listing = bridge.cli("dead-letters", "--json")
    assert listing.returncode == 0, listing.stderr
    letter = {d["topic"]: d for d in json.loads(listing.stdout)}[device.topics.reply]
    assert letter["preview"] == "{not json" and "not JSON" in letter["error"]
    assert "dead-lettered a message on" in bridge.log() and "Traceback" not in bridge.log()


def test_the_console_explains_a_missing_registry(tmp_path):
    config = tmp_path / "bridge.toml"
    config.write_text('[store]\npath = "nothing-here.db"\n')
    out = subprocess.run([str(VENV_BIN / "cloud-bridge"), "devices", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 3
    assert "no registry at" in out.stderr and "is `cloud-bridge serve` running with this config?" in out.stderr


def test_the_bridge_stops_cleanly_on_sigterm(bridge):
    assert stop_process(bridge.process) == 0
    assert "stopped" in bridge.log()


def test_a_command_queued_before_the_device_ever_connected_is_delivered_by_a_resend(bridge, mosquitto,
                                                                                    open_registry):
    out = bridge.cli("send", "dev-late", "ping", "--id", "late-1", "--no-wait")
    assert out.returncode == 0 and "never reported status" in out.stderr
    wait_until(lambda: open_registry.commands.get("late-1").attempts >= 1, what="a first send nobody receives")
    late = FakeDevice(mosquitto.port, bridge.prefix, "dev-late").start()
    try:
        wait_until(lambda: open_registry.commands.get("late-1").state == "succeeded", timeout_s=15,
                   what="late-1 to succeed")
        assert {c["id"] for c in late.received} == {"late-1"}
    finally:
        late.stop()


def test_replies_sent_while_the_bridge_was_down_arrive_when_it_returns(bridge, device, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    out = bridge.cli("send", "dev-1", "ping", "--id", "before", "--timeout", "15")
    assert out.returncode == 0, out.stderr
    assert stop_process(bridge.process) == 0
    device.reply("while-down", "rejected", error={"code": "unknown_kind", "message": "no such kind"})
    bridge.process = launch_bridge(bridge.config_path, bridge.log_path)
    wait_until(lambda: [r.command_id for r in open_registry.replies.of_command("while-down")] == ["while-down"],
               what="the reply queued in the bridge's session")


def test_the_bridge_reconnects_after_a_broker_restart(bridge, device, mosquitto, open_registry):
    wait_until(lambda: _device_online(open_registry, "dev-1"), what="dev-1 online")
    mosquitto.stop()
    mosquitto.start()
    wait_until(lambda: bridge.log().count("connected to") >= 2, timeout_s=15, what="the bridge to reconnect")
    out = bridge.cli("send", "dev-1", "ping", "--timeout", "15")
    assert out.returncode == 0, f"{out.stderr}\n{bridge.log()}"


def test_the_bridge_deletes_what_retention_lets_it_forget(mosquitto, tmp_path):
    folder = tmp_path / "retention"
    config = write_bridge_config(folder, mosquitto.port, "t" + os.urandom(3).hex(),
                                 extra="\n[retention]\ndays = 7\nchunk_days = 1\ncheck_interval_s = 0.2\n")
    registry = Registry.open(folder / "registry.db")
    long_ago = datetime(2020, 1, 1, tzinfo=UTC)
    for moment, message in ((long_ago, "old"), (utc_now(), "new")):
        registry.events.record(Event(device_id="dev-1", ts=format_ts(moment), level="info", code="tick",
                                    message=message, data={}), moment)
    log_path = folder / "bridge.log"
    process = launch_bridge(config, log_path)
    try:
        wait_until(lambda: [e.message for e in registry.feeds.events(0)] == ["new"], what="the old event deleted")
        wait_until(lambda: "retention: deleted 1 events" in log_path.read_text(), what="the retention log line")
    finally:
        assert stop_process(process) == 0, log_path.read_text()
        registry.close()
