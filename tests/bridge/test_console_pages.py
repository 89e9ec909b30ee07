"""The console's command and device panels in a real headless Chromium, against `create_app` served by
uvicorn on a registry file with known rows: every reply of a command with its output text, error
and metrics; a device's identity, telemetry, policy, commands and events."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import uvicorn

from autoglm_wire.protocol import Event, Telemetry, format_ts
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry

from .conftest import free_port, wait_for_port
from .factories import T0, at, command, online, reply

TOKEN = "console-token-0123456789"


@pytest.fixture
def console_url(tmp_path) -> Iterator[str]:
    registry = Registry.open(tmp_path / "registry.db")
    registry.devices.record_status(online("gw-7"), T0)
    registry.devices.record_telemetry(Telemetry(device_id="gw-7", ts=format_ts(T0), queue_depth=0, outbox_depth=3,
                                                outbox_bytes=10, tokens_per_s_ewma=12.5, rss_mb=200.0, gpu_layers=0,
                                                uptime_s=60.0), at(1))
    registry.events.record(Event(device_id="gw-7", ts=format_ts(T0), level="warning", code="model_slow",
                                 message="decode below target"), at(2))
    registry.commands.add(command("chat-1", kind="chat", params={"prompt": "hi"}, device_id="gw-7"), "gw-7", T0)
    registry.replies.record(reply(1, "accepted", "chat-1", device_id="gw-7"), at(3))
    registry.replies.record(reply(2, "succeeded", "chat-1", device_id="gw-7", output={"text": "Hello there, operator"},
                                  metrics={"ttft_ms": 42.0, "tokens_per_s": 11.0}), at(4))
    registry.commands.add(command("chat-2", kind="chat", params={"prompt": "x"}, device_id="gw-7"), "gw-7", T0)
    registry.replies.record(reply(3, "failed", "chat-2", device_id="gw-7",
                                  error={"code": "model_error", "message": "llama.cpp returned -3"}), at(5))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry, BridgeConfig(), TOKEN), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    registry.close()


def test_clicking_a_command_shows_every_reply_and_clicking_a_device_shows_its_page(console_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(console_url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(console_url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-token").click()
    wait = WebDriverWait(browser, 30)
    def command_row(command_id: str):
        return wait.until(lambda b: [r for r in b.find_elements(By.CSS_SELECTOR, "#commands tr.clickable")
                                     if r.text.startswith(command_id)])[0]

    command_row("chat-1").click()
    panel = browser.find_element(By.ID, "command-detail")
    wait.until(lambda b: panel.get_attribute("data-command") == "chat-1")
    text = panel.text
    assert "Hello there, operator" in text and "Reply 1: accepted" in text and "Reply 2: succeeded" in text
    assert '"ttft_ms": 42' in text
    command_row("chat-2").click()
    wait.until(lambda b: panel.get_attribute("data-command") == "chat-2")
    assert "llama.cpp returned -3" in panel.text

    browser.find_element(By.CSS_SELECTOR, "#devices tr.clickable").click()
    device = browser.find_element(By.ID, "device-detail")
    wait.until(lambda b: device.get_attribute("data-device") == "gw-7")
    text = device.text
    assert "outbox_depth 3" in text and "glm-4-tiny" in text
    assert "chat-1" in text and "chat-2" in text and "model_slow" in text
