"""`cloud-bridge serve` as deployed, on a real mosquitto: the health endpoints follow the broker, /metrics
is open on localhost, and an alert raised by the running bridge reaches a webhook that first fails."""

from __future__ import annotations

import os

import httpx

from autoglm_wire.protocol import Status
from cloud_bridge.store.registry import Registry

from .conftest import (
    free_port,
    http_section,
    launch_bridge,
    stop_process,
    wait_for_port,
    wait_until,
    write_bridge_config,
)
from .factories import T0, online
from .http_receiver import Receiver


def test_serve_reports_health_metrics_and_sends_an_alert_to_a_recovering_webhook(mosquitto, tmp_path):
    folder = tmp_path / "bridge"
    folder.mkdir()
    registry = Registry.open(folder / "registry.db")
    registry.devices.record_status(online("gw-1"), T0)
    registry.devices.record_status(Status(device_id="gw-1", state="offline"), T0)  # offline for days
    registry.close()
    receiver = Receiver(failures=2)
    http_port = free_port()
    alerts = ("\n[alerts]\noffline_after_s = 60\ncheck_interval_s = 0.2\nwebhook_backoff_s = 0.01\n"
              "webhook_backoff_max_s = 0.02\n\n[[alerts.webhooks]]\n"
              f'url = "{receiver.url}"\nformat = "alertmanager"\n')
    config = write_bridge_config(folder, mosquitto.port, "t" + os.urandom(3).hex(),
                                 extra=http_section(folder, http_port, "t" * 24) + alerts)
    process = launch_bridge(config, folder / "bridge.log")
    try:
        wait_for_port(http_port)
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 200, what="/readyz 200")
        metrics = httpx.get(f"{url}/metrics")  # bound to 127.0.0.1: no token
        assert metrics.status_code == 200 and 'cloud_bridge_devices{state="offline"} 1.0' in metrics.text
        wait_until(lambda: receiver.accepted, what="the alert at the webhook")
        (body,) = receiver.accepted
        assert body["status"] == "firing" and body["alerts"][0]["labels"]["device"] == "gw-1"
        assert receiver.posts == 3  # two 500s, then accepted
        mosquitto.stop()
        wait_until(lambda: httpx.get(f"{url}/readyz").status_code == 503, what="/readyz 503 without the broker")
        assert "broker not connected" in httpx.get(f"{url}/readyz").json()["problems"][0]
    finally:
        stop_process(process)
        receiver.close()
