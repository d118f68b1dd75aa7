"""Alert delivery to webhooks: an HTTP POST of the alert as JSON to each configured URL, from the outbox the ingest
transaction filled (`store.Deliveries`), in a thread of its own. A failed POST (no connection, a timeout, a status
other than 2xx) is retried with exponential backoff (1, 2, 4 … 60 s) up to the webhook's `max_attempts`, then
marked failed and logged. Ingest never waits for a webhook; a delivery due at a restart is sent after it
(at least once: a receiver should de-duplicate on the alert's id).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from tunelab.config import Webhook
from tunelab.monitor.store import OVERALL, Deliveries

log = logging.getLogger("tunelab.monitor")


def alert_body(row: dict, window_s: int) -> dict:
    start = datetime.fromtimestamp(row["win"], timezone.utc)
    return {"id": row["alert_id"], "rule": row["rule"], "entity": None if row["entity"] == OVERALL else row["entity"],
            "window_start": start.isoformat(), "window_s": window_s, "value": row["value"],
            "statistic": row["statistic"], "volume": row["volume"], "message": row["message"],
            "created_at": datetime.fromtimestamp(row["created_at"], timezone.utc).isoformat()}


def post(hook: Webhook, body: dict) -> str | None:
    """POST `body` to the webhook -> None when it answered 2xx, else what went wrong."""
    data = json.dumps({"alert": body}, ensure_ascii=False).encode()
    request = urllib.request.Request(hook.url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "tunelab-monitor",
                                              **hook.headers})
    try:
        with urllib.request.urlopen(request, timeout=hook.timeout_s) as response:  # noqa: S310 - the user's URL
            response.read(1 << 16)
            return None
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"


class Dispatcher(threading.Thread):
    def __init__(self, deliveries: Deliveries, hooks: list[Webhook], window_s: int, stop: threading.Event,
                 metrics=None, tick_s: float = 0.2):
        super().__init__(name="monitor-webhooks", daemon=True)
        self.deliveries, self.hooks = deliveries, {h.url: h for h in hooks}
        self.window_s, self.stop_event, self.metrics, self.tick_s = window_s, stop, metrics, tick_s
        self.wake = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sent = self.send_due()
            except Exception:  # noqa: BLE001 - the database unreachable for a moment: logged, tried again
                log.exception("webhook delivery round failed")
                sent = 0
            if not sent:
                self.wake.wait(self.tick_s)
                self.wake.clear()

    def send_due(self) -> int:
        """One round: POST every delivery that is due -> how many were attempted."""
        due = self.deliveries.due(time.time())
        for row in due:
            if self.stop_event.is_set():
                break
            hook = self.hooks.get(row["target"])
            if hook is None:  # a webhook removed from the config since the alert: given up
                self.deliveries.record(row["alert_id"], row["target"], "dropped", row["attempts"], 0.0,
                                       "not configured")
                continue
            error = post(hook, alert_body(row, self.window_s))
            attempts = row["attempts"] + 1
            if error is None:
                status, next_at = "delivered", 0.0
            elif attempts >= hook.max_attempts:
                status, next_at = "failed", 0.0
                log.error("alert %s: webhook %s failed %d times (%s); giving up", row["alert_id"], hook.url,
                          attempts, error)
            else:
                status, next_at = "pending", time.time() + min(60.0, 2.0 ** (attempts - 1))
                log.warning("alert %s: webhook %s: %s; retrying in %.0f s", row["alert_id"], hook.url, error,
                            next_at - time.time())
            self.deliveries.record(row["alert_id"], row["target"], status, attempts, next_at, error)
            if self.metrics is not None:
                self.metrics.deliveries.labels("delivered" if error is None else status if status == "failed"
                                               else "retry").inc()
        return len(due)
