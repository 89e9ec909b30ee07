"""The fault audit itself, on made-up replies: it must see what it is there to see."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from tests.faults.harness import audit


def reply(seq: int, status: str, ts: str, command_id: str = "c1") -> dict[str, Any]:
    return {"device_id": "d1", "command_id": command_id, "seq": seq, "status": status, "ts": ts}


def cloud(*replies: dict[str, Any]) -> Any:
    return SimpleNamespace(replies=lambda: list(replies))


def test_a_re_sent_copy_of_a_running_reply_is_one_execution() -> None:
    result = audit(cloud(reply(1, "running", "T1"), reply(1, "running", "T1"), reply(2, "succeeded", "T2")),
                   "d1", ["c1"])
    result.assert_clean()
    assert result.duplicates_received == 1


def test_a_re_run_that_reuses_the_seq_of_a_lost_claim_counts_as_a_second_execution() -> None:
    # the claim (seq 1) was published, then rolled back by a power cut; the re-run takes seq 1 again
    result = audit(cloud(reply(1, "running", "T1"), reply(1, "running", "T9"), reply(2, "succeeded", "T10")),
                   "d1", ["c1"])
    assert result.executed_twice == ["c1"]


def test_two_runs_with_their_own_seqs_are_two_executions() -> None:
    result = audit(cloud(reply(1, "running", "T1"), reply(2, "running", "T2"), reply(3, "succeeded", "T3")),
                   "d1", ["c1"])
    assert result.executed_twice == ["c1"]
