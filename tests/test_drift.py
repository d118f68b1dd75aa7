"""Drift of a served classifier's traffic: the profile a training run writes, the statistics (their false-alarm
rate on clean windows and their power on shifted ones), the server's window and gauges, and its request log
(sampled, PII-redacted, size-bounded: RELIABILITY M4)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import make_rows
from tunelab.config import ServeConfig
from tunelab.errors import UserError
from tunelab.evaluate import drift
from tunelab.serve.app import create_app
from tunelab.serve.registry import check_specs


def synthetic(n: int, rng: np.random.Generator, shift: str | None = None) -> drift.Features:
    """Features of n texts drawn from one fixed distribution, or with one aspect shifted."""
    emb = rng.normal(size=(n, 16)) + np.linspace(0, 1, 16)
    if shift == "embedding":
        emb[: n // 4, :4] += 2.0  # a quarter of the texts from elsewhere
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    prior = [0.2, 0.6, 0.2] if shift == "label" else [0.4, 0.3, 0.3]
    frag = rng.gamma(9, 0.15, n) * (1.25 if shift == "fragmentation" else 1.0)
    return drift.Features(confidence=rng.beta(5, 2, n).astype(np.float32), label=rng.choice(3, n, p=prior),
                          length=rng.gamma(4, 20, n).astype(np.float32), unk=(rng.random(n) < 0.02).astype(np.float32),
                          fragmentation=frag.astype(np.float32), embedding=emb.astype(np.float32))


@pytest.fixture(scope="module")
def profile() -> drift.Profile:
    return drift.build_profile(synthetic(1000, np.random.default_rng(0)), ["a", "b", "c"], "test")


def test_clean_windows_rarely_drift_and_shifted_ones_are_found_by_their_statistic(profile):
    rng = np.random.default_rng(1)
    clean = [drift.compare(profile, synthetic(300, rng), alpha=0.01, permutations=100, seed=i)["drift"]
             for i in range(40)]
    assert sum(clean) <= 4  # nominal 1%: 0.4 expected; 4 is far out in the tail
    for shift, statistic in [("embedding", "embedding_mmd"), ("label", "label_chi2"),
                             ("fragmentation", "fragmentation_ks")]:
        found = [drift.compare(profile, synthetic(300, rng, shift), alpha=0.01, permutations=100, seed=i)
                 for i in range(10)]
        assert sum(r["drift"] for r in found) >= 9, shift
        assert sum(statistic in r["drifted"] for r in found) >= 9, shift


def test_mmd_p_value_resolves_below_its_permutations_and_is_large_on_the_same_sample(profile):
    ref = profile.features.embedding
    _, p_same = drift.mmd_test(ref[:500], ref[500:], profile.bandwidth, permutations=100)
    assert p_same > 0.01
    far = np.roll(ref[:300], 1, axis=1)  # the same vectors, coordinates rotated: another distribution
    mmd2, p_far = drift.mmd_test(ref, far, profile.bandwidth, permutations=100)
    assert mmd2 > 0 and p_far < 1 / 101  # beyond the permutations' resolution: the normal tail


def test_profile_round_trips_and_a_corrupt_one_is_a_clear_error(profile, tmp_path):
    (tmp_path / drift.PROFILE_FILE).write_bytes(profile.to_bytes())
    back = drift.load_profile(tmp_path)
    assert back.labels == ["a", "b", "c"] and len(back.features) == 1000 and back.bandwidth == profile.bandwidth
    assert np.allclose(back.features.embedding, profile.features.embedding, atol=1e-3)
    assert drift.load_profile(tmp_path / "nowhere") is None
    (tmp_path / drift.PROFILE_FILE).write_bytes(b"not an npz")
    with pytest.raises(UserError, match="corrupt"):
        drift.load_profile(tmp_path)


def test_training_writes_a_profile_of_the_validation_split(tiny_classifier):
    meta = json.loads((tiny_classifier / "tunelab.json").read_text())
    prof = drift.load_profile(tiny_classifier)
    assert prof is not None and prof.source == "validation" and prof.labels == meta["labels"]
    assert len(prof.features) == meta["drift_profile"]["rows"] == 30  # the small dataset's validation split
    assert prof.features.embedding.shape[0] == 30
    assert np.allclose(np.linalg.norm(prof.features.embedding, axis=1), 1, atol=1e-2)


def _metric(client, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return None


def _wait_ready(client, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while client.get("/ready").status_code != 200:
        assert time.time() < deadline, "the model did not load"
        time.sleep(0.05)


def _wait_checks(client, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while (_metric(client, "tunelab_drift_checks_total", model="clf") or 0) < n:
        assert time.time() < deadline, "no drift check ran"
        time.sleep(0.05)


def test_server_checks_drift_on_metrics_and_logs_sampled_redacted_requests(tiny_classifier, tmp_path):
    logs = tmp_path / "requests"
    cfg = ServeConfig(models=[f"clf={tiny_classifier}"], embedding_model=None, drift_window=200, drift_every=100,
                      drift_min_window=100, request_log=logs, request_log_sample=0.5, request_log_max_mb=0.02)
    guard = create_app(cfg, check_specs(cfg.models, None), keys=[])
    rng = random.Random(3)
    clean = [r["text"] for r in make_rows(200, seed=11, start=100)]  # numbered as the validation rows are
    shifted = ["".join(rng.choice("天气服务航班延误") for _ in range(20)) + f" mail me at user{i}@example.com"
               for i in range(400)]
    with TestClient(guard, base_url="http://localhost") as client:
        _wait_ready(client)
        for i in range(0, 200, 20):
            assert client.post("/v1/classify", json={"model": "clf", "input": clean[i:i + 20]}).status_code == 200
        _wait_checks(client, 1)
        assert _metric(client, "tunelab_drift_detected", model="clf") == 0
        assert _metric(client, "tunelab_drift_window_requests", model="clf") == 200
        for i in range(0, 400, 20):
            assert client.post("/v1/classify", json={"model": "clf", "input": shifted[i:i + 20]}).status_code == 200
        _wait_checks(client, 3)
        time.sleep(0.5)  # the check started by the last batch
        assert _metric(client, "tunelab_drift_detected", model="clf") == 1
        assert _metric(client, "tunelab_drift_p_value", model="clf", statistic="length_ks") < 1e-4
    lines = [json.loads(x) for p in sorted(logs.glob("requests-*.jsonl")) for x in p.read_text().splitlines()]
    logged = sum(p.stat().st_size for p in logs.glob("requests-*.jsonl"))
    assert logged <= 0.02 * 2 ** 20  # the bound held: the oldest files went
    assert len(list(logs.glob("requests-*.jsonl"))) >= 2
    assert lines and all(set(x) >= {"time", "model", "text", "label", "confidence"} for x in lines)
    assert not any("@example.com" in x["text"] for x in lines)
    assert any("<EMAIL>" in x["text"] for x in lines)


def test_request_log_samples_about_its_share(tmp_path):
    from tunelab.serve.drift import RequestLog

    log = RequestLog(tmp_path, 0.25, 10 * 2 ** 20, seed=0)
    picked = sum(len(log.chosen(100)) for _ in range(40))
    assert 800 < picked < 1200  # 1,000 expected of 4,000


def test_monitor_drift_reports_a_request_log_window(tiny_classifier, tmp_path):
    from tunelab.monitor.drift import drift_report

    log = tmp_path / "log"
    log.mkdir()
    clean = make_rows(120, seed=12, start=100)
    shifted = ["".join(random.Random(i).choice("天气服务航班延误") for _ in range(30)) for i in range(120)]
    with open(log / "requests-000001.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(clean):
            f.write(json.dumps({"time": 1_780_000_000 + i, "model": "clf", "text": r["text"]}) + "\n")
        for i, t in enumerate(shifted):
            f.write(json.dumps({"time": 1_780_001_000 + i, "model": "clf", "text": t}) + "\n")
        f.write('{"time": "yesterday", "model": "clf", "text": "x"}\n{"model": "other", "text": "y"}\nnot json\n')
    r = drift_report(tiny_classifier, [log], tmp_path / "before", model_id="clf", until="1780001000")
    assert r["current"]["texts"] == 120 and not r["drift"]
    skipped = r["current"]["skipped"]
    assert skipped.pop("bad_time") == skipped.pop("other_model") == 1 and skipped.pop("outside_window") == 120
    assert list(skipped.values()) == [1]  # the line that is not JSON, by the reader's reason
    r = drift_report(tiny_classifier, [log], tmp_path / "all", model_id="clf", window=60)
    assert r["drift"] and "embedding_mmd" in r["drifted"]
    assert [w["drift"] for w in r["windows"]] == [False, False, True, True]
    assert (tmp_path / "all" / "drift.png").stat().st_size > 10_000
    assert (tmp_path / "all" / "drift-series.png").is_file()
    from typer.testing import CliRunner

    from tunelab.cli import app

    res = CliRunner().invoke(app, ["monitor", "drift", str(tiny_classifier), "--current", str(log), "--model-id",
                                   "clf", "--window", "60", "--out", str(tmp_path / "cli")])
    out = " ".join(res.output.split())  # the console wraps long lines
    assert res.exit_code == 0, out
    assert "240 texts" in out and "2 of 4 windows of 60 texts drifted" in out and "DRIFT (" in out
    with pytest.raises(UserError, match="at least"):
        drift_report(tiny_classifier, [log], tmp_path / "few", last=5)
    other = tmp_path / "tickets.csv"
    other.write_text("id,内容\n" + "".join(f"{i},航班延误了{i}次，服务很差\n" for i in range(30)), encoding="utf-8")
    with pytest.raises(UserError, match="no `text` column .*--text-column"):
        drift_report(tiny_classifier, [other], tmp_path / "cn")
    r = drift_report(tiny_classifier, [other], tmp_path / "cn", text_column="内容")
    assert r["current"]["texts"] == 30 and r["drift"]
    with pytest.raises(UserError, match="--overwrite"):  # an earlier report is replaced only when asked
        drift_report(tiny_classifier, [other], tmp_path / "cn", text_column="内容")
    with pytest.raises(UserError, match="not written by tunelab"):  # a folder of the user's: never
        drift_report(tiny_classifier, [other], log, text_column="内容", overwrite=True)
    import shutil

    old = tmp_path / "old-model"  # a model dir from before profiles: the report takes --reference
    shutil.copytree(tiny_classifier, old)
    (old / drift.PROFILE_FILE).unlink()
    with pytest.raises(UserError, match="--reference"):
        drift_report(old, [log], tmp_path / "old")
    dataset = json.loads((tiny_classifier / "tunelab.json").read_text())["data"]["path"]
    r = drift_report(old, [log], tmp_path / "old", model_id="clf", reference=Path(dataset))
    assert r["reference"]["rows"] == 30 and r["reference"]["source"].startswith("validation split of") and r["drift"]
    with pytest.raises(UserError, match="--since"):
        drift_report(tiny_classifier, [log], tmp_path / "bad", since="last tuesday")


def test_monitor_alerts_on_a_served_model_that_stays_drifted(tmp_path):
    import http.server
    import threading

    from tunelab.config import ServeTarget
    from tunelab.monitor.metrics import MonitorMetrics
    from tunelab.monitor.store import Store, Views, database_url
    from tunelab.monitor.watch import ServeWatcher
    from tunelab.serve.metrics import Metrics

    served = Metrics()  # the server's own exposition, as its /metrics renders it
    served.version.labels("clf", "sentiment:0123456789ab").set(1)
    served.drift_window.labels("clf").set(500)
    for name, p in [("embedding_mmd", 1e-9), ("label_chi2", 0.3)]:
        served.drift_p.labels("clf", name).set(p)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = served.render()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    store = Store(database_url(tmp_path, None), 3600, webhooks=["http://127.0.0.1:9/hook"])
    metrics = MonitorMetrics([])
    try:
        target = ServeTarget(url=f"http://127.0.0.1:{httpd.server_port}", checks=2, cooldown_s=3600)
        watcher = ServeWatcher([target], store, metrics, threading.Event(), 3600)
        served.drift_detected.labels("clf").set(1)
        assert watcher.poll(target, now=1_780_000_000) == []  # one check is not a trend
        served.drift_detected.labels("clf").set(0)
        assert watcher.poll(target, now=1_780_000_030) == []  # and the streak starts again
        served.drift_detected.labels("clf").set(1)
        assert watcher.poll(target, now=1_780_000_060) == []
        [alert] = watcher.poll(target, now=1_780_000_090)
        assert "sentiment:0123456789ab" in alert["message"] and "embedding_mmd p=1e-09" in alert["message"]
        assert "tunelab registry rollback sentiment" in alert["message"]
        assert watcher.poll(target, now=1_780_000_120) == []  # cool-down: still drifted, not alerted again
        [stored] = Views(store).alerts(10)
        assert stored["entity"] == "clf" and stored["rule"] == "model_drift"
        from tunelab.monitor.store import Deliveries

        assert len(Deliveries(store).due(now=2e9)) == 1  # the webhook outbox has it
        down = ServeTarget(url="http://127.0.0.1:9", checks=1)
        assert watcher.poll(down) == [] and "tunelab_monitor_watch_errors_total" in metrics.render().decode()
    finally:
        httpd.shutdown()
        store.close()


def test_monitor_configs_load_and_sources_need_a_sentiment_model(tmp_path):
    from tunelab.config import load_monitor_config

    examples = sorted((Path(__file__).parent.parent / "examples" / "monitor").glob("*.yaml"))
    assert len(examples) >= 2
    watch = [load_monitor_config(p) for p in examples if "watch" in p.name][0]
    assert watch.sentiment is None and watch.watch[0].checks == 3
    bad = tmp_path / "m.yaml"
    bad.write_text(f"sources: {{folder: {{path: {tmp_path}}}}}\n", encoding="utf-8")
    with pytest.raises(UserError, match="sentiment.model"):
        load_monitor_config(bad)


def test_an_onnx_export_keeps_the_profile_and_is_checked_without_hidden_states(classifier_onnx):
    assert drift.load_profile(classifier_onnx) is not None
    cfg = ServeConfig(models=[f"clf={classifier_onnx}"], embedding_model=None, drift_window=100, drift_every=100,
                      drift_min_window=100)
    guard = create_app(cfg, check_specs(cfg.models, None), keys=[])
    texts = [r["text"] for r in make_rows(100, seed=13, start=100)]
    with TestClient(guard, base_url="http://localhost") as client:
        _wait_ready(client)
        for i in range(0, 100, 25):
            assert client.post("/v1/classify", json={"model": "clf", "input": texts[i:i + 25]}).status_code == 200
        _wait_checks(client, 1)
        assert _metric(client, "tunelab_drift_p_value", model="clf", statistic="confidence_ks") > 0
        assert np.isnan(_metric(client, "tunelab_drift_p_value", model="clf", statistic="embedding_mmd"))
