"""The monitor watching served models: it polls each `tunelab serve`'s /metrics (config `watch:`) and raises an
alert when a model's drift gauge (`tunelab_drift_detected`) stays up for `checks` polls in a row.

The alert goes where the monitor's other alerts go (the database, the log, /metrics, webhooks through the outbox)
and says what to do: which statistics moved, the registry version answering (`tunelab_model_version_info`), the
command that shows the drift report and, for a registry model, the rollback command. A server that cannot be
reached is logged once per outage and counted, never an alert storm.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from tunelab.config import ServeTarget

log = logging.getLogger("tunelab.monitor")

RULE = "model_drift"


@dataclass
class ModelState:
    """What one poll read of a served model."""

    detected: bool = False
    p_values: dict[str, float] = field(default_factory=dict)
    window: int = 0
    version: str | None = None


def metrics_url(url: str) -> str:
    return url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"


def read_models(exposition: str) -> dict[str, ModelState]:
    """The drift state of each model in a server's /metrics text."""
    models: dict[str, ModelState] = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            model = s.labels.get("model")
            if model is None:
                continue
            m = models.setdefault(model, ModelState())
            if s.name == "tunelab_drift_detected":
                m.detected = s.value >= 1
            elif s.name == "tunelab_drift_p_value" and s.value == s.value:  # NaN: not tested
                m.p_values[s.labels["statistic"]] = s.value
            elif s.name == "tunelab_drift_window_requests":
                m.window = int(s.value)
            elif s.name == "tunelab_model_version_info" and s.value >= 1:
                m.version = s.labels.get("version")
    return models


def drift_alert(target: ServeTarget, model: str, state: ModelState, streak: int, now: float, window_s: int) -> dict:
    """The alert for `model` of the server at `target`, as the store keeps it."""
    p_min = min(state.p_values.values(), default=1.0)
    moved = sorted(state.p_values, key=state.p_values.get)[:3]
    where = metrics_url(target.url).removesuffix("/metrics")
    version = f" (version {state.version})" if state.version else ""
    todo = "inspect: tunelab monitor drift MODEL_DIR --current REQUEST_LOG"
    if state.version and ":" in state.version:
        todo += f"; roll back: tunelab registry rollback {state.version.split(':', 1)[0]}"
    message = (f"{RULE}: {model}{version} at {where} drifted in {streak} checks in a row over its last "
               f"{state.window} texts ({', '.join(f'{k} p={state.p_values[k]:.2g}' for k in moved)}); {todo}")
    return {"rule": RULE, "entity": model, "window": int(now // window_s * window_s), "metric": "drift",
            "value": p_min, "statistic": float(streak), "volume": state.window, "message": message}


class ServeWatcher(threading.Thread):
    """Polls the `targets` until `stop` is set; stores alerts through `store.add_alerts`."""

    def __init__(self, targets: list[ServeTarget], store, metrics, stop: threading.Event, window_s: int):
        super().__init__(name="monitor-watch", daemon=True)
        self.targets, self.store, self.metrics, self.stop, self.window_s = targets, store, metrics, stop, window_s
        self.streaks: dict[tuple[str, str], int] = {}
        self.down: set[str] = set()

    def run(self) -> None:
        due = {t.url: 0.0 for t in self.targets}
        while not self.stop.is_set():
            now = time.monotonic()
            for t in self.targets:
                if now >= due[t.url]:
                    due[t.url] = now + t.poll_s
                    self.poll(t)
            self.stop.wait(min(1.0, max(0.05, min(due.values()) - time.monotonic())))

    def poll(self, target: ServeTarget, now: float | None = None) -> list[dict]:
        """Read one server's gauges; -> the alerts stored."""
        url = metrics_url(target.url)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                text = r.read(8 * 2 ** 20).decode("utf-8", "replace")
            models = read_models(text)
        except (urllib.error.URLError, OSError, ValueError) as err:
            self.metrics.watch_errors.labels(url).inc()
            if url not in self.down:
                log.warning("cannot read %s (%s); retrying every %.0f s", url, err, target.poll_s)
                self.down.add(url)
            return []
        if url in self.down:
            log.info("%s answers again", url)
            self.down.discard(url)
        now = time.time() if now is None else now
        raised = []
        for model, state in models.items():
            key = (url, model)
            self.streaks[key] = self.streaks.get(key, 0) + 1 if state.detected else 0
            if self.streaks[key] >= target.checks:
                raised.append(drift_alert(target, model, state, self.streaks[key], now, self.window_s))
        stored = self.store.add_alerts(raised, target.cooldown_s) if raised else []
        for a in stored:
            self.metrics.alert(a)
            log.warning("ALERT %s", a["message"])
        return stored
