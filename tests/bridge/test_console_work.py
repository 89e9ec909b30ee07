"""The console as a place to work, in a real headless Chromium against `create_app` served by uvicorn
on a registry with a recent history: charts drawn from /api/stats/series and /api/fleet (uPlot, served
by the bridge: no request leaves it), paging and
filters, the device page (state history, alerts acknowledged, a policy pushed), the command page
(cancel), live updates pushed over /api/live (the page no longer polls), the send form bounded by the
device's limit, and a group send streaming every member. A thread plays the devices on the registry.

With AUTOGLM_SAVE_SCREENSHOTS=1 the screenshots go to docs/images/ (how they are made)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from autoglm_wire.protocol import Status, StreamChunk, Telemetry, format_ts, utc_now
from cloud_bridge.config import BridgeConfig
from cloud_bridge.http.app import create_app
from cloud_bridge.store.registry import Registry

from .conftest import http_server, requested_urls
from .factories import command, offline, online, reply

TOKEN = "console-work-token-0123456789"
ROOT = Path(__file__).resolve().parents[2]
LIMITS = {"gw-1": 512, "gw-2": 1024}
CHATS = 118  # per device, one every 30 s over the last hour
TOTAL = 2 * CHATS + 1 + 60 + 1  # chats, the failed chat, pings, the waiting command


def _seed(registry: Registry) -> None:
    """Three devices (gw-1, gw-2 online in group lab; gw-3 offline), an hour of chats on gw-1 and gw-2,
    60 pings (paging), a failed chat, a pending command, two alerts."""
    now = utc_now()

    def status(device_id: str, state: str, minutes_ago: float, groups: tuple[str, ...] = ("lab",)) -> None:
        when = now - timedelta(minutes=minutes_ago)
        fields = online(device_id).model_dump() if state == "online" else offline(device_id).model_dump()
        registry.devices.record_status(Status.model_validate({**fields, "ts": format_ts(when), "groups": list(groups)}),
                                       when)

    for device_id in ("gw-1", "gw-2", "gw-3"):
        status(device_id, "online", 70)
    status("gw-3", "offline", 20)
    status("gw-3", "online", 10, ("edge",))
    status("gw-3", "offline", 5, ("edge",))
    for device_id in ("gw-1", "gw-2"):  # membership is the registry's: gw-3 announces edge, assigned nothing
        registry.groups.add(device_id, "lab", now)
    for device_id, limit in LIMITS.items():
        registry.devices.record_telemetry(Telemetry(
            device_id=device_id, ts=format_ts(now), queue_depth=0, outbox_depth=0, outbox_bytes=0,
            tokens_per_s_ewma=12.0, rss_mb=300.0, gpu_layers=0, uptime_s=4000.0, max_tokens_limit=limit), now)
    seq = {"gw-1": 0, "gw-2": 0, "gw-3": 0}

    def answer(device_id: str, command_id: str, status: str, minutes_ago: float, **fields: object) -> None:
        seq[device_id] += 1
        registry.replies.record(reply(seq[device_id], status, command_id=command_id, device_id=device_id, **fields),
                                now - timedelta(minutes=minutes_ago))

    for i in range(CHATS):  # one chat every 30 s on each device, getting slower on gw-2
        for device_id, speed in (("gw-1", 20.0 + i % 3), ("gw-2", 15.0 - i * 0.06)):
            command_id = f"chat-{device_id}-{i}"
            registry.commands.add(command(command_id, kind="chat", params={"prompt": "hi"}, device_id=device_id),
                                  device_id, now - timedelta(minutes=60 - i * 0.5))
            total = 400.0 + (i * 37) % 300 + (1500.0 if i % 9 == 0 else 0.0)
            answer(device_id, command_id, "succeeded", 60 - i * 0.5 - 0.05, output={"text": f"answer {i}"},
                   metrics={"total_ms": total, "ttft_ms": total / 8, "queue_ms": 5.0, "tokens_per_s": speed})
    registry.commands.add(command("chat-broken", kind="chat", params={"prompt": "x"}, device_id="gw-1"), "gw-1",
                          now - timedelta(minutes=3))
    answer("gw-1", "chat-broken", "failed", 2.9, error={"code": "model_error", "message": "llama.cpp returned -3"})
    for i in range(60):
        registry.commands.add(command(f"ping-{i:02d}", device_id="gw-3"), "gw-3", now - timedelta(minutes=90 - i))
    registry.commands.add(command("waiting-1", kind="chat", params={"prompt": "later"}, device_id="gw-3"), "gw-3", now)
    registry.alerts.open("gw-3", "offline", "gw-3 has been offline for 5 min", now - timedelta(minutes=4))
    registry.alerts.open("gw-2", "tokens_per_s_drop", "decode speed fell from 15.0 to 8.4 tokens/s",
                         now - timedelta(minutes=1))


@pytest.fixture
def console(tmp_path, browser) -> Iterator[tuple[str, Registry]]:
    registry = Registry.open(tmp_path / "registry.db")
    _seed(registry)
    with http_server(create_app(registry, BridgeConfig(), TOKEN)) as url:
        yield url, registry
        browser.get("about:blank")  # closes the page's live stream before the server stops
    registry.close()


def _login(browser, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "save-token").click()
    return WebDriverWait(browser, 30)


def _screenshot(browser, name: str) -> None:
    saving = os.environ.get("AUTOGLM_SAVE_SCREENSHOTS") == "1"
    folder = ROOT / "docs" / "images" if saving else Path(tempfile.gettempdir())
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(max(900, height + 40), 4000))  # the whole page
    try:
        assert browser.save_screenshot(str(folder / name))
    finally:
        browser.set_window_size(1280, 900)


def _series(browser, chart: str) -> list[str]:
    """The series of the uPlot in `#chart`, from its legend (not live: the time axis has no row)."""
    from selenium.webdriver.common.by import By

    labels = browser.find_elements(By.CSS_SELECTOR, f"#{chart} .uplot .u-legend .u-series .u-label")
    return [label.text for label in labels]


def _pixels(browser, chart: str, color: str) -> int:
    """How many pixels of the chart's canvas are drawn in `color` ("#rrggbb")."""
    return browser.execute_script("""
        const canvas = document.querySelector("#" + arguments[0] + " canvas"), want = arguments[1];
        const rgb = [1, 3, 5].map((i) => parseInt(want.slice(i, i + 2), 16));
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4)
          if (rgb.every((v, j) => Math.abs(data[i + j] - v) < 8) && data[i + 3] > 200) n++;
        return n;""", chart, color)


def test_charts_paging_and_filters(console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, _ = console
    requested_urls(browser)  # drop what earlier pages requested
    wait = _login(browser, url)
    wait.until(lambda b: _series(b, "chart-latency") == ["p50", "p95", "p99"])
    assert _series(browser, "chart-speed") == ["gw-1", "gw-2"]
    # lines drawn: p50 and p99 (p95 lies under p99 in this history), gw-1 and gw-2
    for chart, color in (("chart-latency", "#1f77b4"), ("chart-latency", "#2ca02c"), ("chart-speed", "#1f77b4"),
                         ("chart-speed", "#d62728")):
        assert _pixels(browser, chart, color) > 100, f"{chart} draws nothing in {color}"
    bars = {(r.get_attribute("data-name"), r.get_attribute("data-count"))
            for r in browser.find_elements(By.CSS_SELECTOR, "#chart-fleet rect")}
    assert {("online", "2"), ("offline", "1"), ("tokens_per_s_drop", "1"), ("failed", "1"), ("pending", "61"),
            ("succeeded", str(2 * CHATS))} <= bars
    pager = browser.find_element(By.CSS_SELECTOR, "#commands-pager span")
    wait.until(lambda b: pager.text == f"1–50 of {TOTAL}")
    urls = requested_urls(browser)
    assert url + "/vendor/uplot-1.6.32/uPlot.iife.min.js" in urls and url + "/vendor/uplot-1.6.32/uPlot.min.css" in urls
    elsewhere = [u for u in urls if not u.startswith(url + "/") and not u.startswith("data:")]
    assert not elsewhere, f"the console loaded from elsewhere: {elsewhere}"
    _screenshot(browser, "console-overview.png")
    browser.find_element(By.CSS_SELECTOR, '#commands-pager [data-step="1"]').click()
    wait.until(lambda b: pager.text == f"51–100 of {TOTAL}")
    Select(browser.find_element(By.ID, "command-state")).select_by_visible_text("failed")
    wait.until(lambda b: pager.text == "1–1 of 1")
    assert "chat-broken" in browser.find_element(By.ID, "commands").text
    Select(browser.find_element(By.ID, "device-state")).select_by_visible_text("offline")
    wait.until(lambda b: [r.text.split()[0] for r in b.find_elements(By.CSS_SELECTOR, "#devices tbody tr")] == ["gw-3"])
    assert browser.find_element(By.CSS_SELECTOR, "#devices-pager span").text == "1–1 of 1"


def test_device_page_acknowledges_an_alert_and_pushes_a_policy(console, browser):
    from selenium.webdriver.common.by import By

    url, registry = console
    wait = _login(browser, url)
    browser.get(url + "/#device=gw-3")
    panel = browser.find_element(By.ID, "device-detail")
    wait.until(lambda b: panel.get_attribute("data-device") == "gw-3" and "State history" in panel.text)
    history = [row.text for row in panel.find_elements(By.CSS_SELECTOR, "#device-states tbody tr")]
    assert [line.split()[0] for line in history] == ["offline", "online", "offline", "online"]
    assert "waiting-1" in panel.text and "ping-59" in panel.text
    assert _fact(panel, "groups") == "-" and _fact(panel, "announced_groups") == "edge"  # assigned vs announced
    panel.find_element(By.XPATH, ".//button[text()='Acknowledge']").click()
    wait.until(lambda b: "by file at" in b.find_element(By.ID, "device-detail").text)
    assert registry.alerts.recent(device_id="gw-3")[0].acknowledged_by == "file"

    panel = browser.find_element(By.ID, "device-detail")
    panel.find_element(By.CSS_SELECTOR, '#policy-form input[name="max_tokens"]').send_keys("128")
    panel.find_element(By.CSS_SELECTOR, '#policy-form input[name="temperature"]').send_keys("0.2")
    panel.find_element(By.CSS_SELECTOR, "#policy-form button").click()
    wait.until(lambda b: "Queued" in b.find_element(By.ID, "policy-status").text)
    [config] = [c for c in registry.commands.recent("gw-3", 5) if c.kind == "config"]
    assert config.payload["params"] == {"max_tokens": 128, "temperature": 0.2}
    browser.get(url + "/#device=gw-2")
    wait.until(lambda b: b.find_element(By.ID, "device-detail").get_attribute("data-device") == "gw-2")
    assert _fact(browser.find_element(By.ID, "device-detail"), "groups") == "lab"
    _screenshot(browser, "console-device.png")


def _fact(panel, name: str) -> str:
    """The value next to `name` in a facts table of the device page."""
    from selenium.webdriver.common.by import By

    return panel.find_element(By.XPATH, f".//tr[td[1]='{name}']/td[2]").text


def test_command_page_shows_the_error_and_cancels(console, browser):
    from selenium.webdriver.common.by import By

    url, registry = console
    wait = _login(browser, url)
    browser.get(url + "/#command=chat-broken")
    panel = browser.find_element(By.ID, "command-detail")
    wait.until(lambda b: panel.get_attribute("data-command") == "chat-broken")
    assert "llama.cpp returned -3" in panel.text and not panel.find_elements(By.TAG_NAME, "button")  # ended
    browser.get(url + "/#command=waiting-1")
    wait.until(lambda b: b.find_element(By.ID, "command-detail").get_attribute("data-command") == "waiting-1")
    browser.find_element(By.XPATH, "//button[text()='Cancel this command']").click()
    wait.until(lambda b: "queued" in b.find_element(By.ID, "command-action-status").text)
    [cancel] = [c for c in registry.commands.recent("gw-3", 5) if c.kind == "cancel"]
    assert cancel.payload["params"]["target"] == "waiting-1"
    browser.get(url + f"/#command=chat-gw-2-{CHATS - 1}")
    last = f"chat-gw-2-{CHATS - 1}"
    wait.until(lambda b: b.find_element(By.ID, "command-detail").get_attribute("data-command") == last)
    _screenshot(browser, "console-command.png")


def test_live_updates_arrive_without_a_poll(console, browser):
    from selenium.webdriver.common.by import By

    url, registry = console
    wait = _login(browser, url)
    wait.until(lambda b: "waiting-1" in b.find_element(By.ID, "commands").text)
    wait.until(lambda b: "live-on" in b.find_element(By.ID, "live-status").get_attribute("class"))
    registry.commands.add(command("pushed-1", kind="ping", device_id="gw-1"), "gw-1", utc_now())
    registry.replies.record(reply(1000, "succeeded", command_id="pushed-1", device_id="gw-1",
                                  output={"pong": True}), utc_now())
    registry.devices.record_status(offline("gw-1"), utc_now())
    wait.until(lambda b: "pushed-1" in b.find_element(By.ID, "commands").text)  # the page has no poll: pushed
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, '#devices td.offline[data-device="gw-1"]'))
    events = int(browser.execute_script("return document.body.dataset.liveEvents"))
    assert events >= 2  # the first fleet counts, then the reply, the state change, new counts


def test_send_form_is_bounded_by_the_device_and_a_group_send_streams_every_member(console, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    url, registry = console
    wait = _login(browser, url)
    wait.until(lambda b: "group/lab" in [o.get_attribute("value")
                                         for o in b.find_elements(By.CSS_SELECTOR, "#target *")])
    target = Select(browser.find_element(By.ID, "target"))
    target.select_by_value("gw-2")
    wait.until(lambda b: b.find_element(By.ID, "max-tokens").get_attribute("max") == "1024")
    target.select_by_value("group/lab")
    wait.until(lambda b: b.find_element(By.ID, "max-tokens").get_attribute("max") == "512")  # the lowest member limit
    stop = threading.Event()
    devices = threading.Thread(target=_play_devices, args=(registry, stop), daemon=True)
    devices.start()
    try:
        browser.find_element(By.ID, "system").send_keys("Answer in two words.")
        browser.find_element(By.ID, "prompt").send_keys("Status?")
        browser.find_element(By.ID, "send-button").click()
        status = browser.find_element(By.ID, "send-status")
        wait.until(lambda b: status.get_attribute("data-state") in ("succeeded", "failed", "unknown"))
        assert status.get_attribute("data-state") == "succeeded", status.text
        members = {m.get_attribute("data-device"): m.text
                   for m in browser.find_elements(By.CSS_SELECTOR, "#answer .member")}
        assert set(members) == {"gw-1", "gw-2"}
        assert all(text.endswith(f"all fine from {device}") for device, text in members.items())
        assert int(browser.find_element(By.ID, "answer").get_attribute("data-deltas")) == 6  # 3 chunks x 2 members
        _screenshot(browser, "console-group-send.png")
    finally:
        stop.set()
        devices.join(10)
    sent = [c for c in registry.commands.recent(None, 10) if c.batch is not None]
    assert {c.device_id for c in sent} == {"gw-1", "gw-2"}
    system = {"role": "system", "content": "Answer in two words."}
    assert all(c.payload["params"]["messages"][0] == system for c in sent)


def _play_devices(registry: Registry, stop: threading.Event) -> None:
    """Answer each new chat sent to a group: accepted, three stream chunks, succeeded."""
    answered: set[str] = set()
    seq = 5000
    while not stop.is_set():
        for row in registry.commands.recent(None, 10):
            if row.batch is None or row.id in answered or row.kind != "chat":
                continue
            answered.add(row.id)
            wire = row.wire_id or row.id
            seq += 1
            registry.replies.record(reply(seq, "accepted", command_id=wire, device_id=row.device_id), utc_now())
            words = ["all ", "fine ", f"from {row.device_id}"]
            for index, delta in enumerate(words):
                chunk = StreamChunk(command_id=wire, index=index, delta=delta, done=False)
                registry.chunks.record(row.device_id, chunk)
                time.sleep(0.05)
            seq += 1
            registry.replies.record(reply(seq, "succeeded", command_id=wire, device_id=row.device_id,
                                          output={"text": "".join(words), "finish_reason": "stop"}), utc_now())
        stop.wait(0.1)
