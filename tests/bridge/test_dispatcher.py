"""The cloud-side command lifecycle: when to send, resend, wait or expire. Pure, no broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cloud_bridge.dispatcher import Action, CommandView, decide, message_expiry_s

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
RESEND = 5.0


def view(state: str = "sent", attempts: int = 1, sent_ago_s: float | None = 0.0,
         expires_in_s: float | None = 3600.0) -> CommandView:
    return CommandView(
        state=state,
        attempts=attempts,
        last_sent_at=None if sent_ago_s is None else T0 - timedelta(seconds=sent_ago_s),
        expires_at=None if expires_in_s is None else T0 + timedelta(seconds=expires_in_s),
    )


def test_a_pending_command_is_sent_at_once():
    assert decide(view("pending", 0, None), "online", T0, RESEND).action is Action.SEND


def test_a_pending_command_is_sent_even_to_an_offline_device_so_its_session_holds_a_copy():
    assert decide(view("pending", 0, None), "offline", T0, RESEND).action is Action.SEND


def test_a_sent_command_waits_until_the_resend_interval_has_passed():
    decision = decide(view(sent_ago_s=2.0), "online", T0, RESEND)
    assert decision.action is Action.WAIT
    assert decision.wake_at == T0 + timedelta(seconds=3.0)


def test_a_sent_command_without_accepted_is_resent_after_the_interval():
    assert decide(view(sent_ago_s=5.0), "online", T0, RESEND).action is Action.SEND


def test_a_device_that_never_reported_status_gets_resends_since_it_may_have_no_session_yet():
    assert decide(view(sent_ago_s=6.0), None, T0, RESEND).action is Action.SEND


def test_a_sent_command_is_not_resent_while_the_device_is_offline():
    assert decide(view(sent_ago_s=60.0), "offline", T0, RESEND).action is Action.WAIT


@pytest.mark.parametrize("state", ["accepted", "running", "succeeded", "failed", "rejected", "expired", "cancelled"])
def test_once_the_device_accepted_the_bridge_leaves_the_command_alone(state):
    assert decide(view(state, sent_ago_s=600.0, expires_in_s=-1.0), "online", T0, RESEND).action is Action.NONE


@pytest.mark.parametrize("state", ["pending", "sent"])
def test_a_command_not_accepted_by_expires_at_is_expired(state):
    decision = decide(view(state, expires_in_s=0.0), "online", T0, RESEND)
    assert decision.action is Action.EXPIRE
    assert "expires_at" in decision.reason


def test_the_wake_time_never_passes_the_expiry():
    decision = decide(view(sent_ago_s=0.0, expires_in_s=1.0), "online", T0, RESEND)
    assert decision.wake_at == T0 + timedelta(seconds=1.0)


def test_a_command_without_expiry_is_resent_forever():
    assert decide(view(sent_ago_s=10_000.0, expires_in_s=None), "online", T0, RESEND).action is Action.SEND


def test_message_expiry_is_whole_seconds_left_and_at_least_one():
    assert message_expiry_s(T0 + timedelta(seconds=9.2), T0) == 10
    assert message_expiry_s(T0 - timedelta(seconds=5), T0) == 1
    assert message_expiry_s(None, T0) is None
