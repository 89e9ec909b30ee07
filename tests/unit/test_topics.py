"""Topic names of protocol v1: built by DeviceTopics, taken apart by parse_cloud_topic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoglm_wire.topics import (
    CloudTopic,
    DeviceTopics,
    check_group,
    cloud_subscriptions,
    group_cmd,
    parse_cloud_topic,
)

device_ids = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64)
command_ids = st.text(alphabet="abcXYZ019_.:-", min_size=1, max_size=128)


def test_a_device_has_one_topic_per_channel_under_prefix_and_device_id() -> None:
    topics = DeviceTopics("autoglm", "pi-7")
    assert topics.cmd == "autoglm/pi-7/cmd"
    assert topics.reply == "autoglm/pi-7/reply"
    assert topics.status == "autoglm/pi-7/status"
    assert topics.telemetry == "autoglm/pi-7/telemetry"
    assert topics.event == "autoglm/pi-7/event"
    assert topics.stream("c:1") == "autoglm/pi-7/stream/c:1"


def test_a_prefix_may_span_several_levels() -> None:
    assert DeviceTopics("site/a", "d1").reply == "site/a/d1/reply"


@pytest.mark.parametrize("device_id", ["", "a/b", "a+b", "#", "a b", "x" * 65, "dé", "a:b"])
def test_a_device_id_that_is_not_1_to_64_safe_characters_is_refused(device_id: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        DeviceTopics("autoglm", device_id)


@pytest.mark.parametrize("prefix", ["", "/autoglm", "autoglm/", "auto+glm", "auto#", "a\0b"])
def test_a_prefix_with_wildcards_nul_or_edge_slashes_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        DeviceTopics(prefix, "d1")


@pytest.mark.parametrize("command_id", ["", "a/b", "+", "#", "x" * 129])
def test_a_stream_topic_refuses_a_command_id_that_is_not_a_topic_level(command_id: str) -> None:
    with pytest.raises(ValueError):
        DeviceTopics("autoglm", "d1").stream(command_id)


def test_a_group_command_topic_sits_under_prefix_group() -> None:
    assert group_cmd("autoglm", "lab") == "autoglm/group/lab/cmd"


@pytest.mark.parametrize("group", ["", "a/b", "+", "x" * 65])
def test_an_invalid_group_name_is_refused(group: str) -> None:
    with pytest.raises(ValueError):
        check_group(group)
    with pytest.raises(ValueError):
        group_cmd("autoglm", group)


@pytest.mark.parametrize("channel", ["status", "reply", "event", "telemetry"])
def test_every_device_to_cloud_channel_round_trips(channel: str) -> None:
    topics = DeviceTopics("autoglm", "d1")
    assert parse_cloud_topic("autoglm", getattr(topics, channel)) == CloudTopic("d1", channel)


def test_a_stream_topic_round_trips_with_its_command_id() -> None:
    topic = DeviceTopics("site/a", "d1").stream("c-9")
    assert parse_cloud_topic("site/a", topic) == CloudTopic("d1", "stream", "c-9")


@settings(max_examples=200)
@given(device_ids.filter(lambda d: d != "group"), command_ids)
def test_any_valid_device_and_command_id_round_trip(device_id: str, command_id: str) -> None:
    topics = DeviceTopics("autoglm", device_id)
    assert parse_cloud_topic("autoglm", topics.reply) == CloudTopic(device_id, "reply")
    assert parse_cloud_topic("autoglm", topics.stream(command_id)) == CloudTopic(device_id, "stream", command_id)


def test_a_device_named_group_is_either_refused_or_round_trips() -> None:
    try:
        topics = DeviceTopics("autoglm", "group")
    except ValueError:
        return
    assert parse_cloud_topic("autoglm", topics.reply) == CloudTopic("group", "reply")


@pytest.mark.parametrize(
    "topic",
    [
        "autoglm/group/lab/cmd",
        "autoglm/d1/cmd",
        "other/d1/reply",
        "autoglmx/d1/reply",
        "autoglm/d1/reply/extra",
        "autoglm/d1/stream",
        "autoglm/d1/stream/c1/extra",
        "autoglm/d1/stream/a+b",
        "autoglm/a+b/reply",
        "autoglm/d1",
        "autoglm/",
        "autoglm",
        "autoglm//reply",
    ],
)
def test_topics_that_are_not_device_to_cloud_are_not_parsed(topic: str) -> None:
    assert parse_cloud_topic("autoglm", topic) is None


def test_cloud_subscriptions_cover_every_channel_of_every_device() -> None:
    assert sorted(cloud_subscriptions("autoglm")) == sorted(
        ["autoglm/+/status", "autoglm/+/reply", "autoglm/+/event", "autoglm/+/telemetry", "autoglm/+/stream/+"]
    )


def test_cloud_subscriptions_refuse_a_bad_prefix() -> None:
    with pytest.raises(ValueError):
        cloud_subscriptions("auto/#")
