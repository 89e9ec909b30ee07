"""Alert notifications that reach people: each alert raised or cleared is POSTed to every
`[[alerts.webhooks]]`, at least once.

`enqueue` writes one delivery row per webhook in the transaction that changes the alert (the
registry's `alert_deliveries` is the outbox and the delivery log); `deliver_due` sends the due rows.
A round is up to `webhook_attempts` POSTs with exponential backoff (tenacity); a round that fails
leaves the row pending for another round `webhook_retry_after_s` later, until
`webhook_give_up_after_s` after the change, when it is marked failed. A delivery is claimed before
it is sent, so bridge replicas do not send it twice, and a bridge that dies mid-round leaves it to
be retried (a receiver may see a notification twice, never zero times).

Payloads: `alertmanager` is Alertmanager's webhook format (version 4: what Alertmanager itself
POSTs to its receivers, so tools built for it accept it); `json` is `{"event", "alert"}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta

from tenacity import Retrying, stop_after_attempt, wait_exponential

from cloud_bridge.config import AlertConfig, WebhookConfig
from cloud_bridge.store.deliveries import DeliveryRow
from cloud_bridge.store.registry import Registry
from cloud_bridge.store.rows import AlertRow

log = logging.getLogger(__name__)
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end" time
Post = Callable[[str, bytes, float], None]  # (url, body, timeout_s); raises on a failed delivery


def alertmanager_payload(alert: AlertRow, event: str) -> dict[str, object]:
    """Alertmanager's webhook body (version 4) for one alert."""
    status = "firing" if event == "raised" else "resolved"
    labels = {"alertname": alert.kind, "device": alert.device_id, "service": "cloud-bridge"}
    fingerprint = hashlib.sha256(f"{alert.device_id}/{alert.kind}/{alert.raised_at}".encode()).hexdigest()[:16]
    return {
        "version": "4", "groupKey": f"{{}}:{{alertname=\"{alert.kind}\", device=\"{alert.device_id}\"}}",
        "truncatedAlerts": 0, "status": status, "receiver": "cloud-bridge", "groupLabels": labels,
        "commonLabels": labels, "commonAnnotations": {"summary": alert.message}, "externalURL": "",
        "alerts": [{"status": status, "labels": labels, "annotations": {"summary": alert.message},
                    "startsAt": alert.raised_at, "endsAt": alert.cleared_at or ZERO_TIME,
                    "generatorURL": "", "fingerprint": fingerprint}],
    }


def payload(alert: AlertRow, event: str, format_: str) -> str:
    if format_ == "alertmanager":
        return json.dumps(alertmanager_payload(alert, event))
    return json.dumps({"event": event, "alert": asdict(alert)})


def enqueue(registry: Registry, webhooks: list[WebhookConfig], alert: AlertRow, event: str, now: datetime) -> None:
    """One pending delivery per webhook; call inside the transaction that raised or cleared `alert`."""
    for hook in webhooks:
        registry.deliveries.enqueue(alert.id, event, hook.url, hook.format, payload(alert, event, hook.format), now)


def post_json(url: str, body: bytes, timeout_s: float) -> None:
    """POST `body`; raises OSError (urllib.error.URLError/HTTPError) unless the answer is 2xx."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (http(s) only, by config)
        response.read()


def deliver_due(registry: Registry, config: AlertConfig, now: datetime, post: Post = post_json) -> int:
    """Send every due delivery (one round each); returns how many were delivered."""
    timeouts = {hook.url: hook.timeout_s for hook in config.webhooks}
    delivered = 0
    for row in registry.deliveries.due(now):
        if registry.deliveries.claim(row, now + timedelta(seconds=config.webhook_retry_after_s)):
            delivered += _round(registry, config, row, timeouts.get(row.webhook, 10.0), now, post)
    return delivered


def _round(registry: Registry, config: AlertConfig, row: DeliveryRow, timeout_s: float, now: datetime,
           post: Post) -> int:
    retrying = Retrying(stop=stop_after_attempt(config.webhook_attempts), reraise=True,
                        wait=wait_exponential(multiplier=config.webhook_backoff_s, max=config.webhook_backoff_max_s))
    attempts = 0
    try:
        for attempt in retrying:
            with attempt:
                attempts += 1
                post(row.webhook, row.payload.encode(), timeout_s)
    except OSError as exc:
        created = datetime.fromisoformat(row.created_at)
        gave_up = now - created >= timedelta(seconds=config.webhook_give_up_after_s)
        state = "failed" if gave_up else "pending"
        log.warning("alert webhook %s: %d POST(s) failed (%s); %s", row.webhook, attempts, exc,
                    "giving up" if gave_up else f"next round in {config.webhook_retry_after_s:g} s")
        registry.deliveries.finish(row.id, attempts, f"{type(exc).__name__}: {exc}", state, now)
        return 0
    registry.deliveries.finish(row.id, attempts, None, "delivered", now)
    return 1
