"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide).

The names are part of the interface (dashboards are built on them) and are pinned by a test.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tunelab_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.rejections = Counter("tunelab_rejections", "requests refused before inference, by reason",
                                  ["reason"], registry=r)
        self.queue_depth = Gauge("tunelab_queue_depth", "requests waiting for a batch slot", ["model"], registry=r)
        self.queue_capacity = Gauge("tunelab_queue_capacity", "requests that may wait for a batch slot (max_waiting); "
                                    "beyond it: 503", ["model"], registry=r)
        self.running = Gauge("tunelab_running_batch_size", "sequences (or texts) in the running batch",
                             ["model"], registry=r)
        self.ttft = Histogram("tunelab_time_to_first_token_seconds", "time to the first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("tunelab_request_latency_seconds", "end-to-end latency of inference requests",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("tunelab_generated_tokens", "tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "prompt tokens prefilled", ["model"], registry=r)
        self.reloads = Counter("tunelab_model_reloads", "registry versions loaded to replace a served one, by "
                               "outcome (swapped, failed)", ["model", "outcome"], registry=r)
        self.version = Gauge("tunelab_model_version_info", "the registry version a model answers with (1)",
                             ["model", "version"], registry=r)

        self.drift_p = Gauge("tunelab_drift_p_value", "the last drift check's p-value per statistic (window against "
                             "the model's reference profile)", ["model", "statistic"], registry=r)
        self.drift_stat = Gauge("tunelab_drift_statistic", "the last drift check's statistic (MMD², KS D, χ², "
                                "rate difference)", ["model", "statistic"], registry=r)
        self.drift_detected = Gauge("tunelab_drift_detected", "1 when the last drift check found drift (the smallest "
                                    "p-value under alpha / statistics), else 0", ["model"], registry=r)
        self.drift_window = Gauge("tunelab_drift_window_requests", "texts in the model's drift window", ["model"],
                                  registry=r)
        self.drift_checks = Counter("tunelab_drift_checks", "drift checks run", ["model"], registry=r)
        self.drift_observed = Counter("tunelab_drift_observed_texts", "texts put into the drift window", ["model"],
                                      registry=r)

    def render(self) -> bytes:
        """Every metric of this server, in Prometheus' text exposition format (the body of GET /metrics)."""
        return generate_latest(self.registry)
