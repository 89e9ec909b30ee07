"""The agent's Prometheus text from a `Numbers` snapshot (edge_agent/metrics.py), without an agent:
every field reported once, with its labels; absent values leave their family out."""

from __future__ import annotations

from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from edge_agent.metrics import Numbers, exposition

NUMBERS = Numbers(device_id="gw-1", agent_version="1.2.3", model="tiny", queue_depth=2, outbox_rows=5, outbox_bytes=640,
                  reconnects=3, connect_failures=4, store_bytes=81920, model_load_s=1.25, tokens_per_s_ewma=18.5,
                  rss_bytes=300 * 1024 * 1024, uptime_s=42.0, broker_connected=True,
                  commands={"chat": {"succeeded": 7, "failed": 1}, "ping": {"succeeded": 2}},
                  dropped={"events": 6})


def samples(numbers: Numbers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = exposition(lambda: numbers)().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_number_is_exported_once_with_its_labels():
    got = samples(NUMBERS)
    assert got == {
        ("autoglm_agent_info", (("agent_version", "1.2.3"), ("device_id", "gw-1"), ("model", "tiny"))): 1,
        ("autoglm_agent_queue_depth", ()): 2, ("autoglm_agent_outbox_rows", ()): 5,
        ("autoglm_agent_outbox_bytes", ()): 640, ("autoglm_agent_store_bytes", ()): 81920,
        ("autoglm_agent_resident_memory_bytes", ()): 300 * 1024 * 1024, ("autoglm_agent_uptime_seconds", ()): 42.0,
        ("autoglm_agent_broker_connected", ()): 1, ("autoglm_agent_model_load_seconds", ()): 1.25,
        ("autoglm_agent_decode_tokens_per_second", ()): 18.5, ("autoglm_agent_reconnects_total", ()): 3,
        ("autoglm_agent_connect_failures_total", ()): 4,
        ("autoglm_agent_commands", (("kind", "chat"), ("state", "failed"))): 1,
        ("autoglm_agent_commands", (("kind", "chat"), ("state", "succeeded"))): 7,
        ("autoglm_agent_commands", (("kind", "ping"), ("state", "succeeded"))): 2,
        ("autoglm_agent_dropped_total", (("what", "events"),)): 6,
    }


def test_a_fresh_agent_leaves_out_what_it_does_not_know_yet():
    got = samples(replace(NUMBERS, model_load_s=None, tokens_per_s_ewma=None, broker_connected=False, commands={}))
    names = {name for name, _ in got}
    assert "autoglm_agent_model_load_seconds" not in names and "autoglm_agent_decode_tokens_per_second" not in names
    assert got[("autoglm_agent_broker_connected", ())] == 0
    assert not any(name == "autoglm_agent_commands" for name, _ in got)
