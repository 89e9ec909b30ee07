"""The whole stack: a real mosquitto, a real `edge-agent run` on the tiny GLM GGUF, `cloud-bridge serve`
with its HTTP server, then the official `openai` client and a headless Chromium against it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from autoglm_wire.protocol import Status, format_ts, utc_now
from tests.support.agent_proc import AgentProcess, write_agent_config
from tests.support.broker import Broker
from tests.support.cloud import CloudClient

from .conftest import HttpBridge, start_http_bridge, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = ROOT / "models" / "tiny-glm4-q4_0.gguf"
DEVICE = "gw-stack"


@dataclass
class Stack:
    bridge: HttpBridge
    agent: AgentProcess
    broker: Broker

    @property
    def url(self) -> str:
        return self.bridge.url

    @property
    def token(self) -> str:
        return self.bridge.token

    def command(self, command_id: str) -> dict:
        return self.bridge.api.get(f"/api/commands/{command_id}").json()


def _device_online(api: httpx.Client) -> bool:
    devices = api.get("/api/devices").json()
    return any(d["device_id"] == DEVICE and d["state"] == "online" for d in devices)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not TINY_MODEL.exists():
        pytest.skip(f"{TINY_MODEL} is missing: run `make model`")
    folder = tmp_path_factory.mktemp("stack")
    broker = Broker(folder / "broker").start()
    agent = AgentProcess(write_agent_config(folder / "agent.toml", DEVICE, broker.port, TINY_MODEL,
                                            folder / "agent.db"),
                         folder / "agent.log", env={"EDGE_AGENT_MQTT__GROUPS": '["lab"]'}).start()
    bridge = start_http_bridge(folder / "bridge", broker.port, "autoglm")
    try:
        wait_until(lambda: _device_online(bridge.api), 120, f"{DEVICE} online in the bridge's registry")
        assert bridge.api.put(f"/api/groups/lab/members/{DEVICE}").json()["added"]  # membership is the cloud's
        yield Stack(bridge, agent, broker)
    finally:
        bridge.stop()
        agent.stop_quietly()
        broker.stop()


def test_a_ping_to_the_group_reaches_the_agent_over_the_group_topic_and_is_tracked_for_it(stack):
    created = stack.bridge.api.post("/api/commands", json={"target": "group/lab", "kind": "ping"}).json()
    (row,) = created["commands"]
    assert row["device_id"] == DEVICE and row["payload"]["target"] == "group/lab"
    wait_until(lambda: stack.command(row["id"])["state"] == "succeeded", 60, "the group ping to succeed")
    final = stack.command(row["id"])
    assert final["reply"]["command_id"] == created["batch"] and final["reply"]["output"]["pong"] is True
    assert "group/lab/cmd" in stack.bridge.log_path.read_text()


def test_a_rogue_device_claiming_a_group_in_its_retained_status_gets_none_of_its_work(stack):
    """Issue #19 attack 2 on the real stack: gw-rogue publishes a retained status saying it is in
    `lab` and `site-b`; the registry assigns it nothing."""
    rogue = Status(device_id="gw-rogue", state="online", ts=format_ts(utc_now()), agent_version="0.1.0",
                   kinds=["ping", "chat"], groups=["lab", "site-b"])
    with closing(CloudClient(stack.broker.port)) as client:
        client.client.publish("autoglm/gw-rogue/status", rogue.model_dump_json(exclude_none=True), qos=1,
                              retain=True).wait_for_publish(10)
        wait_until(lambda: stack.bridge.api.get("/api/devices/gw-rogue").status_code == 200, 30, "the rogue's status")
        client.client.publish("autoglm/gw-rogue/status", b"", qos=1, retain=True).wait_for_publish(10)
        gone = Status(device_id="gw-rogue", state="offline", ts=format_ts(utc_now()))
        client.client.publish("autoglm/gw-rogue/status", gone.model_dump_json(exclude_none=True), qos=1,
                              ).wait_for_publish(10)  # the attack is over: the rest of the module sees it gone
    models = {m["id"] for m in stack.bridge.api.get("/v1/models").json()["data"]}
    assert "group/site-b" not in models and "group/lab" in models
    for target in ({"target": "group/lab"}, {"filter": {"group": "lab"}}):
        created = stack.bridge.api.post("/api/commands", json={**target, "kind": "ping"}).json()
        assert [c["device_id"] for c in created["commands"]] == [DEVICE], target
    refused = stack.bridge.api.post("/api/commands", json={"filter": {"group": "site-b"}, "kind": "ping"})
    assert refused.status_code == 400 and "registry" in refused.json()["error"]["message"]
    chat = stack.bridge.api.post("/v1/chat/completions", json={
        "model": "group/site-b", "messages": [{"role": "user", "content": "the site-b secret"}], "max_tokens": 4})
    assert chat.status_code in (404, 503)
    assert not any("site-b secret" in json.dumps(c["payload"]) for c in stack.bridge.api.get("/api/commands").json())


# --- the OpenAI-compatible endpoint --------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_client(stack: Stack):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, max_retries=0, timeout=120)


def test_the_openai_client_gets_a_completion_from_the_device(stack, openai_client):
    completion = openai_client.chat.completions.create(
        model=DEVICE, messages=[{"role": "user", "content": "Hello GLM"}], max_tokens=8, seed=7)
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens > 0 and completion.usage.prompt_tokens > 0
    command = stack.command(completion.id.removeprefix("chatcmpl-"))
    assert command["device_id"] == DEVICE and command["state"] == "succeeded"
    assert command["reply"]["output"]["text"] == choice.message.content


def test_the_openai_client_streams_the_tokens_as_the_device_produces_them(stack, openai_client):
    stream = openai_client.chat.completions.create(
        model="group/lab", messages=[{"role": "user", "content": "Count"}], max_tokens=12, seed=3, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(deltas) >= 2 and len(finish) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    command = stack.command(chunks[0].id.removeprefix("chatcmpl-"))
    assert command["device_id"] == DEVICE and command["reply"]["output"]["text"] == "".join(deltas)


def test_an_unknown_model_is_a_404_that_says_how_to_list_models(stack, openai_client):
    import openai

    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        openai_client.chat.completions.create(model="no-such-gw", messages=[{"role": "user", "content": "hi"}])
    assert {m.id for m in openai_client.models.list()} >= {DEVICE, "group/lab"}


# --- the web console in a real headless Chromium -------------------------------------------------


def test_the_console_page_shows_the_device_live_and_streams_an_answer_to_a_prompt(stack, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(stack.url + "/")
    browser.find_element(By.ID, "token").send_keys(stack.token)
    browser.find_element(By.ID, "save-token").click()
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'#devices td.online[data-device="{DEVICE}"]'))
    wait.until(lambda b: DEVICE in [o.get_attribute("value") for o in b.find_elements(By.CSS_SELECTOR, "#target *")])
    _save_screenshot(browser, "console-devices.png")

    Select(browser.find_element(By.ID, "target")).select_by_value(DEVICE)  # other devices may sort first
    browser.find_element(By.ID, "prompt").send_keys("Hello from the browser")
    browser.find_element(By.ID, "send-button").click()
    status = browser.find_element(By.ID, "send-status")
    wait.until(lambda b: status.get_attribute("data-state") in ("succeeded", "failed", "expired", "cancelled"))
    assert status.get_attribute("data-state") == "succeeded", status.text
    answer = browser.find_element(By.ID, "answer").text
    assert int(browser.find_element(By.ID, "answer").get_attribute("data-deltas")) >= 2  # streamed, not pasted
    command_id = status.text.split()[1]
    final = stack.command(command_id)
    assert final["kind"] == "chat" and final["payload"]["params"]["stream"] is True
    assert answer.strip() == final["reply"]["output"]["text"].strip() and answer.strip()
    wait.until(lambda b: command_id in b.find_element(By.ID, "commands").text)
    _save_screenshot(browser, "console-answer.png")


def _save_screenshot(browser, name: str) -> None:
    """A PNG of the page: into docs/ with AUTOGLM_SAVE_SCREENSHOTS=1 (how docs/console-*.png are made),
    else into a scratch folder, so a test run leaves the tree unchanged."""
    folder = ROOT / "docs" if os.environ.get("AUTOGLM_SAVE_SCREENSHOTS") == "1" else Path(tempfile.gettempdir())
    assert browser.save_screenshot(str(folder / name))
