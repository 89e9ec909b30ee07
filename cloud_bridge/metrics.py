"""The bridge's Prometheus metrics, collected from the registry at each scrape.

A custom collector queries the store (cloud_bridge.store.observations) rather than keeping a second
copy of its state in process: every bridge replica on one PostgreSQL database reports the same
fleet-wide numbers. Labels are bounded: `kind` (the protocol's command kinds), `state`, `type`,
`reason` and alert kinds are small fixed sets; `device` grows with the fleet and is left out of the
histograms with `[metrics] device_labels = false` (docs/operations.md lists every metric).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from cloud_bridge.store.registry import Registry

LATENCY_BOUNDS_MS = (50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 120000.0,
                     300000.0)
SPEED_BOUNDS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
HISTOGRAMS = {  # reply metric -> (Prometheus name, help, bucket bounds)
    "queue_ms": ("cloud_bridge_queue_seconds", "time a command waited in the device's queue", LATENCY_BOUNDS_MS),
    "ttft_ms": ("cloud_bridge_ttft_seconds", "time to the first generated token", LATENCY_BOUNDS_MS),
    "total_ms": ("cloud_bridge_total_seconds", "time from the start of execution to the reply", LATENCY_BOUNDS_MS),
    "tokens_per_s": ("cloud_bridge_decode_tokens_per_second", "decode speed of a generation", SPEED_BOUNDS),
}
TELEMETRY_GAUGES = {  # telemetry field -> (Prometheus name, help)
    "outbox_depth": ("cloud_bridge_device_outbox_depth", "messages waiting in the device's outbox"),
    "rss_mb": ("cloud_bridge_device_rss_megabytes", "resident memory of the device's agent"),
    "queue_depth": ("cloud_bridge_device_queue_depth", "commands queued on the device"),
    "reconnects": ("cloud_bridge_device_reconnects", "broker reconnects of the device's agent since it started"),
    "store_bytes": ("cloud_bridge_device_store_bytes", "size of the device's SQLite store"),
}


class RegistryCollector(Collector):
    """Everything `/metrics` reports, read from `registry` when scraped."""

    def __init__(self, registry: Registry, device_labels: bool) -> None:
        self._registry = registry
        self._device_labels = device_labels

    def collect(self) -> Iterator[Metric]:
        seen = self._registry.observations
        commands = GaugeMetricFamily("cloud_bridge_commands", "commands in the registry by kind and state",
                                     labels=["kind", "state"])
        for row in seen.commands_by_kind_and_state():
            commands.add_metric([row["kind"], row["state"]], row["n"])
        yield commands
        resends = CounterMetricFamily("cloud_bridge_command_resends", "publishes of a command beyond its first",
                                      labels=["kind"])
        for row in seen.resends():
            resends.add_metric([row["kind"]], row["n"] or 0)
        yield resends
        stored = GaugeMetricFamily("cloud_bridge_messages_stored", "device messages held in the registry",
                                   labels=["type"])
        for kind, n in seen.messages_stored().items():
            stored.add_metric([kind], n)
        yield stored
        yield from self._counters()
        devices = GaugeMetricFamily("cloud_bridge_devices", "devices by state", labels=["state"])
        for row in seen.devices_by_state():
            devices.add_metric([row["state"]], row["n"])
        yield devices
        alerts = GaugeMetricFamily("cloud_bridge_alerts_open", "open alerts by kind", labels=["kind"])
        for row in seen.open_alerts_by_kind():
            alerts.add_metric([row["kind"]], row["n"])
        yield alerts
        yield from self._telemetry()
        yield from self._histograms()

    def _counters(self) -> Iterator[Metric]:
        counts = self._registry.counters.all()
        dead = CounterMetricFamily("cloud_bridge_dead_letters", "messages the bridge could not store")
        dead.add_metric([], counts.get("dead_letters", 0))
        yield dead
        duplicates = CounterMetricFamily("cloud_bridge_duplicates_dropped",
                                         "redelivered device messages stored once", labels=["type"])
        for kind in ("replies", "chunks", "events"):
            duplicates.add_metric([kind], counts.get(f"duplicate_{kind}", 0))
        yield duplicates

    def _telemetry(self) -> Iterator[Metric]:
        """Per device; without device labels, the fleet's highest value."""
        rows = self._registry.observations.telemetry(*TELEMETRY_GAUGES)
        for field, (name, help_text) in TELEMETRY_GAUGES.items():
            values = {row["device_id"]: float(row[field]) for row in rows if row[field] is not None}
            if self._device_labels:
                gauge = GaugeMetricFamily(name, help_text + " (last telemetry)", labels=["device"])
                for device_id, value in values.items():
                    gauge.add_metric([device_id], value)
            else:
                gauge = GaugeMetricFamily(name, help_text + " (last telemetry, the fleet's highest)",
                                          value=max(values.values(), default=0.0))
            yield gauge

    def _histograms(self) -> Iterator[Metric]:
        labels = ["device", "kind"] if self._device_labels else ["kind"]
        for metric, (name, help_text, bounds) in HISTOGRAMS.items():
            scale = 0.001 if metric.endswith("_ms") else 1.0
            family = HistogramMetricFamily(name, help_text, labels=labels)
            for h in self._registry.observations.histogram(metric, bounds, self._device_labels):
                buckets = [(f"{bound * scale:g}", n) for bound, n in zip(bounds, h.buckets, strict=True)]
                buckets.append(("+Inf", h.count))
                values = [h.device_id, h.kind] if self._device_labels else [h.kind]
                family.add_metric(values, buckets, h.total * scale)
            yield family
