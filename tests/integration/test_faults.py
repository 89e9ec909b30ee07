"""Nothing lost: broker restarts, a SIGKILLed agent, and a broker that is down at agent start."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support.agent_proc import outbox_rows, read_ledger
from tests.support.broker import Broker
from tests.support.cloud import CloudClient, chat, command

pytestmark = pytest.mark.integration

TERMINAL = {"succeeded", "failed", "rejected", "expired", "cancelled"}


def _long_chats(n: int, tokens: int = 1500) -> list[dict]:
    return [command("chat", chat(f"job {i}", max_tokens=tokens, seed=i)) for i in range(n)]


def test_replies_produced_while_the_broker_is_down_arrive_after_it_restarts(
        own_broker: Broker, start_agent) -> None:
    cloud = CloudClient(own_broker.port, client_id="cloud-broker-restart")
    agent, device_id, store = start_agent(own_broker)
    cloud.wait_online(device_id)
    jobs = _long_chats(4)
    for job in jobs:
        cloud.send(device_id, job)
    cloud.wait_for(lambda: all(cloud.replies(j["id"]) for j in jobs), 30, "all commands accepted")
    own_broker.stop(signal.SIGTERM)  # sessions (the cloud's queue included) are saved to disk
    # the agent keeps working offline: every job reaches a terminal state, replies wait in the outbox
    cloud.wait_for(lambda: set(read_ledger(store).values()) <= TERMINAL, 120, "all jobs done offline")
    stranded = outbox_rows(store)
    assert stranded > 0, "expected replies produced while the broker was down to wait in the outbox"
    own_broker.start()
    cloud.wait_for(lambda: all(cloud.terminal(j["id"]) for j in jobs), 60, "terminal replies after restart")
    cloud.wait_for(lambda: outbox_rows(store) == 0, 30, "outbox drained after the broker's acks")
    for job in jobs:
        assert [r["status"] for r in cloud.terminal(job["id"])] == ["succeeded"]
    seqs = [r["seq"] for r in cloud.unique_replies().values()]
    assert len(seqs) == len(set(seqs))
    assert agent.terminate() == 0
    cloud.close()


def test_a_sigkilled_agent_loses_no_accepted_command_and_no_stored_reply(
        own_broker: Broker, start_agent) -> None:
    cloud = CloudClient(own_broker.port, client_id="cloud-agent-kill")
    agent, device_id, store = start_agent(own_broker)
    cloud.wait_online(device_id)
    jobs = _long_chats(5, tokens=2500)
    for job in jobs:
        cloud.send(device_id, job)
    cloud.wait_for(lambda: all(cloud.replies(j["id"]) for j in jobs), 30, "all commands accepted")
    cloud.wait_for(lambda: "running" in read_ledger(store).values(), 30, "a command running")
    agent.kill()  # kill -9 in the middle of a generation
    ledger = read_ledger(store)
    assert set(ledger) == {j["id"] for j in jobs}, "every accepted command is in the SQLite inbox"
    killed_while_running = [cid for cid, state in ledger.items() if state == "running"]
    assert len(killed_while_running) == 1

    agent, _, _ = start_agent(own_broker, device_id=device_id)
    cloud.wait_for(lambda: all(cloud.terminal(j["id"]) for j in jobs), 120, "every command terminal")
    for job in jobs:
        (reply,) = cloud.terminal(job["id"])  # exactly one terminal reply after dedupe by seq
        if job["id"] in killed_while_running:
            assert reply["status"] == "failed" and reply["error"]["code"] == "internal"
        else:
            assert reply["status"] == "succeeded"
    # nothing ran twice: a command has at most one `running` reply
    for job in jobs:
        assert len({r["seq"] for r in cloud.replies(job["id"]) if r["status"] == "running"}) <= 1
    seqs = sorted(r["seq"] for r in cloud.unique_replies().values())
    assert len(seqs) == len(set(seqs))
    assert agent.terminate() == 0
    cloud.close()


def test_a_sigkilled_agent_with_4_generations_running_resolves_each_exactly_once(
        own_broker: Broker, start_agent) -> None:
    """`model.parallel = 4`: kill -9 while four generations decode together; on restart each of the
    four fails as `internal` (not run again), the two queued ones run, every reply's seq in order."""
    cloud = CloudClient(own_broker.port, client_id="cloud-agent-kill-parallel")
    agent, device_id, store = start_agent(own_broker, tail="parallel = 4\n")
    cloud.wait_online(device_id)
    jobs = _long_chats(6, tokens=2500)
    for job in jobs:
        cloud.send(device_id, job)
    cloud.wait_for(lambda: all(cloud.replies(j["id"]) for j in jobs), 30, "all commands accepted")
    cloud.wait_for(lambda: list(read_ledger(store).values()).count("running") == 4, 60, "four commands running")
    agent.kill()
    ledger = read_ledger(store)
    assert set(ledger) == {j["id"] for j in jobs}
    killed_while_running = {cid for cid, state in ledger.items() if state == "running"}
    assert len(killed_while_running) == 4
    assert sorted(ledger.values()) == ["accepted"] * 2 + ["running"] * 4

    agent, _, _ = start_agent(own_broker, device_id=device_id, tail="parallel = 4\n")
    cloud.wait_for(lambda: all(cloud.terminal(j["id"]) for j in jobs), 180, "every command terminal")
    for job in jobs:
        (reply,) = cloud.terminal(job["id"])
        if job["id"] in killed_while_running:
            assert reply["status"] == "failed" and reply["error"]["code"] == "internal"
        else:
            assert reply["status"] == "succeeded"
        statuses = sorted(cloud.replies(job["id"]), key=lambda r: r["seq"])
        assert len({r["seq"] for r in statuses if r["status"] == "running"}) <= 1, "nothing ran twice"
        order = [r["status"] for r in statuses]
        assert order.index("accepted") < order.index(reply["status"]), "seq order intact"
    seqs = sorted(r["seq"] for r in cloud.unique_replies().values())
    assert len(seqs) == len(set(seqs))
    assert agent.terminate() == 0
    cloud.close()


def test_an_agent_started_while_the_broker_is_down_connects_when_it_comes_up(
        tmp_path, start_agent) -> None:
    broker = Broker(tmp_path / "late-broker")  # configured, not started
    agent, device_id, store = start_agent(broker)
    time.sleep(3.0)  # the agent retries with backoff meanwhile
    assert agent.process is not None and agent.process.poll() is None, agent.log_text()
    broker.start()
    cloud = CloudClient(broker.port)
    cloud.wait_online(device_id, timeout=30)
    ping = command("ping")
    cloud.send(device_id, ping)
    assert cloud.wait_terminal(ping["id"])["status"] == "succeeded"
    assert "retrying in" in agent.log_text()
    assert agent.terminate() == 0
    cloud.close()
    broker.stop()


def test_commands_sent_while_the_agent_is_down_are_delivered_when_it_returns(
        own_broker: Broker, start_agent) -> None:
    cloud = CloudClient(own_broker.port)
    agent, device_id, store = start_agent(own_broker)
    cloud.wait_online(device_id)
    assert agent.terminate() == 0
    cloud.wait_for(lambda: cloud.on(f"{device_id}/status")[-1]["state"] == "offline", 10, "offline status")
    pings = [command("ping") for _ in range(3)]
    for ping in pings:
        cloud.send(device_id, ping)  # queued by the broker in the agent's persistent session
    agent, _, _ = start_agent(own_broker, device_id=device_id)
    for ping in pings:
        assert cloud.wait_terminal(ping["id"], timeout=60)["status"] == "succeeded"
    assert agent.terminate() == 0
    cloud.close()
