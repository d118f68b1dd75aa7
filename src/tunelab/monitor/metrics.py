"""Prometheus metrics of a monitor (its own registry). The HTTP guard's two (`tunelab_requests`,
`tunelab_rejections`) have the names `tunelab serve` gives them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BATCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class MonitorMetrics:
    def __init__(self, watchlist: list[str]):
        r = self.registry = CollectorRegistry()
        self.watchlist = set(watchlist)
        self.requests = Counter("tunelab_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.rejections = Counter("tunelab_rejections", "requests refused before reading them, by reason",
                                  ["reason"], registry=r)
        self.documents = Counter("tunelab_monitor_documents", "documents ingested, by outcome (stored, duplicate, "
                                 "rejected)", ["outcome"], registry=r)
        self.rejected = Counter("tunelab_monitor_rejected_documents", "documents refused, by reason", ["reason"],
                                registry=r)
        self.alerts = Counter("tunelab_monitor_alerts", "alerts raised, by rule and entity (watch-list names; "
                              "others as 'other', the whole stream as '*')", ["rule", "entity"], registry=r)
        self.last_alert = Gauge("tunelab_monitor_last_alert_timestamp_seconds", "when a rule last raised an alert",
                                ["rule"], registry=r)
        self.deliveries = Counter("tunelab_monitor_webhook_deliveries", "webhook attempts, by outcome (delivered, "
                                  "retry, failed)", ["outcome"], registry=r)
        self.batch_seconds = Histogram("tunelab_monitor_batch_seconds", "time to score and commit one batch",
                                       buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("tunelab_monitor_queue_depth", "work items waiting for the pipeline", registry=r)
        self.watch_errors = Counter("tunelab_monitor_watch_errors", "polls of a watched server's /metrics that "
                                    "failed", ["url"], registry=r)

    def alert(self, alert: dict) -> None:
        entity = alert["entity"]
        self.alerts.labels(alert["rule"], entity if entity in self.watchlist or entity == "*" else "other").inc()
        self.last_alert.labels(alert["rule"]).set_to_current_time()

    def render(self) -> bytes:
        return generate_latest(self.registry)
