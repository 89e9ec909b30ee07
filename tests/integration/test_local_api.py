"""The local OpenAI-compatible API (`[http]`) of a real agent (tiny GGUF, real mosquitto), driven by
the official `openai` client: requests become commands in the same ledger and outbox."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.agent_proc import AgentProcess, read_ledger, write_agent_config
from tests.support.broker import Broker, free_port, wait_for_port
from tests.support.cloud import CloudClient
from tests.support.faulty_agent import command as faulty_command

pytestmark = pytest.mark.integration

TOKEN = "local-api-test-token-0123456789"


def start(tmp_path: Path, tiny_model: Path, broker: Broker, device: str, parallel: int = 1,
          launcher: list[str] | None = None, port: int | None = None) -> tuple[AgentProcess, int]:
    port = port or free_port()
    (tmp_path / "token").write_text(TOKEN + "\n")
    tail = (f"parallel = {parallel}\n[http]\nenabled = true\nport = {port}\ntoken_file = \"token\"\n"
            "max_body_bytes = 4096\n")
    config = write_agent_config(tmp_path / f"{device}.toml", device, broker.port, tiny_model,
                                tmp_path / f"{device}.db", tail=tail)
    agent = AgentProcess(config, tmp_path / f"{device}.log", command=launcher).start()
    wait_for_port(port, timeout=120)
    return agent, port


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
           session_broker: Broker) -> Iterator[tuple[int, Path, str]]:
    tmp = tmp_path_factory.mktemp("local-api")
    agent, port = start(tmp, tiny_model, session_broker, "gw-local", parallel=2)
    yield port, tmp / "gw-local.db", "gw-local"
    agent.stop_quietly()


def client(port: int, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0, timeout=120)


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_chat_is_a_command_in_the_ledger_and_its_reply_reaches_the_cloud(served: tuple[int, Path, str],
                                                                         cloud: CloudClient) -> None:
    port, store, device = served
    answer = client(port).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Pump 3 reads"}], max_tokens=8, temperature=0,
        extra_body={"unknown_field": 1})
    command_id = answer.id.removeprefix("chatcmpl-")
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert read_ledger(store)[command_id] == "succeeded"
    reply = cloud.wait_terminal(command_id)
    assert reply["device_id"] == device and reply["status"] == "succeeded"
    assert reply["output"]["text"] == answer.choices[0].message.content


def test_completion_whole_and_streamed_give_the_same_greedy_text(served: tuple[int, Path, str]) -> None:
    port = served[0]
    api = client(port)
    whole = api.completions.create(model="any", prompt="Valve 7 is", max_tokens=8, temperature=0)
    chunks = list(api.completions.create(model="any", prompt="Valve 7 is", max_tokens=8, temperature=0,
                                         stream=True))
    assert whole.choices[0].text
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_stream_with_usage(served: tuple[int, Path, str]) -> None:
    stream = client(served[0]).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_json_schema_output_matches_the_schema(served: tuple[int, Path, str]) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = client(served[0]).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Is pump 3 ok?"}], max_tokens=32, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": schema}})
    assert isinstance(json.loads(answer.choices[0].message.content or "")["ok"], bool)


def test_limits_reject_with_a_4xx_in_openai_shape(served: tuple[int, Path, str]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(served[0]).completions.create(model="any", prompt="x", max_tokens=8000)  # limits.max_tokens is 4096
    assert caught.value.code == "invalid_command"
    assert "limits.max_tokens" in caught.value.message


def test_wrong_token_is_401_and_models_list_needs_the_token(served: tuple[int, Path, str]) -> None:
    port = served[0]
    with pytest.raises(openai.AuthenticationError) as caught:
        client(port, token="wrong-token-wrong-token").models.list()
    assert caught.value.code == "invalid_api_key"
    models = client(port).models.list()
    assert [m.owned_by for m in models.data] == ["gw-local"]


def answer_to(port: int, request: bytes) -> str:
    """Send `request` (headers only) and read the whole answer: the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received.decode()


def test_unauthenticated_body_is_not_read_and_oversized_body_is_413(served: tuple[int, Path, str]) -> None:
    port = served[0]
    # Announce a large body, send none of it: the answer comes at once (the server never waits for it).
    head = answer_to(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000000\r\n\r\n")
    assert head.startswith("HTTP/1.1 401") and '"invalid_api_key"' in head
    head = answer_to(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 1000000\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and "http.max_body_bytes" in head
    with pytest.raises(openai.APIStatusError) as caught:
        client(port).completions.create(model="any", prompt="x" * 8000, max_tokens=4)
    assert caught.value.status_code == 413


def test_healthz_and_readyz_without_auth(served: tuple[int, Path, str]) -> None:
    assert get(served[0], "/healthz") == (200, {"status": "alive"})
    assert get(served[0], "/readyz") == (200, {"status": "ready", "reason": None,
                                               "checks": {"broker": "ok", "store": "ok", "model": "ok"}})


def test_two_local_requests_run_together_with_parallel_2(tmp_path: Path, tiny_model: Path,
                                                        session_broker: Broker) -> None:
    """Two executor slots held at once: both commands must reach `command_running` (claimed by a
    worker; an early start passes it after its generation, before its reply is stored) and wait there
    for each other. With one worker the second is never claimed while the first waits: "rendezvous
    broken" after 60 s, and the test fails."""
    agent, port = start(tmp_path, tiny_model, session_broker, "gw-two", parallel=2,
                        launcher=faulty_command(rendezvous="command_running:2"))
    answers: list[str] = []

    def ask(prompt: str) -> None:
        answer = client(port).completions.create(model="any", prompt=prompt, max_tokens=16, temperature=0)
        answers.append(answer.id.removeprefix("cmpl-"))

    try:
        threads = [threading.Thread(target=ask, args=(p,)) for p in ("Pump 3 reads", "Valve 7 is")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        ledger = read_ledger(tmp_path / "gw-two.db")
        assert len(answers) == 2 and all(ledger[a] == "succeeded" for a in answers)
        assert "rendezvous met at command_running" in agent.log_text()
        assert "rendezvous broken" not in agent.log_text()
    finally:
        agent.stop_quietly()


def test_readyz_is_503_while_the_broker_is_down(tmp_path: Path, tiny_model: Path, own_broker: Broker) -> None:
    agent, port = start(tmp_path, tiny_model, own_broker, "gw-ready")
    try:
        own_broker.stop()
        status, body = get(port, "/readyz")
        while status == 200:  # the link notices the broker's loss within its keepalive
            status, body = get(port, "/readyz")
        assert (status, body) == (503, {"status": "not ready", "reason": "not connected to the MQTT broker",
                                        "checks": {"broker": "not connected to the MQTT broker", "store": "ok",
                                                   "model": "ok"}})
        assert get(port, "/healthz")[0] == 200
    finally:
        agent.stop_quietly()


def test_agent_refuses_to_start_without_a_readable_token(tmp_path: Path, tiny_model: Path,
                                                         session_broker: Broker) -> None:
    config = write_agent_config(tmp_path / "a.toml", "gw-notoken", session_broker.port, tiny_model,
                                tmp_path / "a.db", tail='[http]\nenabled = true\ntoken_file = "missing"\n')
    agent = AgentProcess(config, tmp_path / "a.log").start()
    assert agent.process is not None and agent.process.wait(timeout=60) == 2
    assert "http.token_file" in agent.log_text()




def test_kill_9_during_a_local_request_loses_the_connection_and_never_runs_it_twice(
        tmp_path: Path, tiny_model: Path, session_broker: Broker, cloud: CloudClient) -> None:
    agent, port = start(tmp_path, tiny_model, session_broker, "gw-kill", launcher=faulty_command("command_running"))
    with pytest.raises(openai.APIConnectionError):
        client(port).completions.create(model="any", prompt="Pump 3 reads", max_tokens=8)
    assert agent.process is not None and agent.process.wait(timeout=30) == -9
    store = tmp_path / "gw-kill.db"
    [command_id] = [c for c, state in read_ledger(store).items() if c.startswith("local-")]
    assert read_ledger(store)[command_id] == "running"
    restarted, _ = start(tmp_path, tiny_model, session_broker, "gw-kill", port=port)
    try:
        reply = cloud.wait_terminal(command_id)
        assert reply["status"] == "failed" and reply["error"]["code"] == "internal"
        assert reply["metrics"]["origin"] == "local" and reply["metrics"]["kind"] == "complete"
        assert read_ledger(store)[command_id] == "failed"
        assert len(cloud.terminal(command_id)) == 1
    finally:
        restarted.stop_quietly()


def test_a_port_already_taken_stops_the_agent_with_exit_2(tmp_path: Path, tiny_model: Path,
                                                         session_broker: Broker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "token").write_text(TOKEN)
        config = write_agent_config(tmp_path / "a.toml", "gw-taken", session_broker.port, tiny_model,
                                    tmp_path / "a.db",
                                    tail=f'[http]\nenabled = true\nport = {port}\ntoken_file = "token"\n')
        agent = AgentProcess(config, tmp_path / "a.log").start()
        assert agent.process is not None and agent.process.wait(timeout=60) == 2
    assert f"http.host/http.port = 127.0.0.1:{port}: cannot listen there" in agent.log_text()


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    """A request sent on a raw socket, so the test can close it when it likes."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def new_local_command(store: Path, before: set[str], state: str) -> str:
    """The one local command that appeared in the ledger since `before`, once it is in `state`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fresh = {c: s for c, s in read_ledger(store).items() if c.startswith("local-") and c not in before}
        if len(fresh) == 1 and state in fresh.values():
            return next(iter(fresh))
        time.sleep(0.02)
    raise AssertionError(f"no new local command reached {state}: {fresh}")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_mid_request_cancels_its_command(served: tuple[int, Path, str], cloud: CloudClient,
                                                                   stream: bool) -> None:
    port, store, device = served
    before = set(read_ledger(store))
    sock = raw_request(port, "/v1/completions", {"model": "any", "prompt": "Long", "max_tokens": 4000,
                                                  "stream": stream})
    command_id = new_local_command(store, before, "running")
    if stream:  # the headers and the first text chunk have arrived: the stream is flowing
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
    sock.close()
    reply = cloud.wait_terminal(command_id)
    assert reply["status"] == "cancelled" and reply["output"]["usage"]["completion_tokens"] < 4000
    assert read_ledger(store)[command_id] == "cancelled"

    def cancels() -> list[dict]:
        return [r for r in cloud.replies() if r["status"] == "succeeded" and r["metrics"].get("kind") == "cancel"
                and r["output"].get("target") == command_id]

    # the cancel's own reply may reach the cloud after its target's
    cloud.wait_for(cancels, 30, "the reply of the local cancel command")
    assert cancels()[0]["metrics"]["origin"] == "local"  # the cancel is a local command the cloud sees
    if stream:
        assert cloud.on(f"/stream/{command_id}"), "a streamed local command streams to the cloud too"


def test_a_streamed_local_request_streams_its_chunks_to_the_cloud(served: tuple[int, Path, str],
                                                                   cloud: CloudClient) -> None:
    chunks = list(client(served[0]).completions.create(model="any", prompt="Valve 7 is", max_tokens=8,
                                                       temperature=0, stream=True))
    command_id = chunks[0].id.removeprefix("cmpl-")
    text = "".join(c.choices[0].text for c in chunks)
    cloud.wait_terminal(command_id)
    cloud.wait_for(lambda: any(c.get("done") for c in cloud.on(f"/stream/{command_id}")), 10, "the last chunk")
    assert "".join(c["delta"] for c in cloud.on(f"/stream/{command_id}")) == text
