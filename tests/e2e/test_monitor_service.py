"""`tunelab monitor run` as a process: kill -9 mid-stream and restart (counts exact), standard input, the HTTP side
(keys, limits, idempotent POST /ingest, metrics) and the dashboard in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_process import KEY

START = 1767571200
WATCH = [{"name": "ACME", "aliases": ["@acme"]}, {"name": "Globex", "aliases": []}]


def docs(n: int, prefix: str = "d", start: int = 0) -> list[dict]:
    who = ["ACME is up", "Globex fell", "rain today", "ACME and Globex merge"]
    return [{"id": f"{prefix}{i}", "timestamp": START + i * 30, "text": f"{who[i % 4]} #{i}"}
            for i in range(start, start + n)]


def mentions(rows: list[dict]) -> int:
    return sum(("ACME" in r["text"]) + ("Globex" in r["text"]) for r in rows)


def write_config(tmp_path: Path, model: Path, **over) -> Path:
    cfg = {"state": str(tmp_path / "state"), "window_s": 3600, "sentiment": {"model": str(model)},
           "entities": {"watchlist": WATCH}, "max_batch": 32,
           "sources": {"folder": {"path": str(tmp_path / "inbox"), "poll_s": 0.1}},
           "http": {"enabled": False},
           "rules": [{"name": "busy", "kind": "threshold", "metric": "volume", "above": 3, "min_volume": 1}]}
    cfg.update(over)
    (tmp_path / "inbox").mkdir(exist_ok=True)
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def start(config: Path, *args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from tunelab.cli import main; main()", "monitor", "run",
                             str(config), *args], env={**os.environ, "TUNELAB_API_KEYS": "", **(env or {})}, **kw)


def count(db: Path, sql: str = "SELECT count(*) FROM documents") -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        try:
            return conn.execute(sql).fetchone()[0] or 0
        except sqlite3.OperationalError:  # the tables are not created yet
            return 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def write_jsonl(path: Path, rows: list, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_kill_9_mid_stream_then_restart_loses_and_doubles_nothing(tmp_path, tiny_classifier):
    config = write_config(tmp_path, tiny_classifier)
    db = tmp_path / "state" / "monitor.db"
    rows = docs(3000)
    write_jsonl(tmp_path / "inbox" / "big.jsonl", rows[:10] + ["not json", '{"id": "x", "text": "no time"}']
                + rows[10:])
    proc = start(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: count(db) >= 300, 120, "the first batches")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    killed_at = count(db)
    assert 300 <= killed_at < len(rows), "killed mid-stream"
    # meanwhile: more lines appended, a new file with 50 new documents and 50 already stored ones
    more = docs(300, start=3000)
    write_jsonl(tmp_path / "inbox" / "big.jsonl", more, "a")
    write_jsonl(tmp_path / "inbox" / "late.jsonl", docs(50, "late") + rows[:50])
    expected = rows + more + docs(50, "late")
    log = tmp_path / "restart.log"
    proc = start(config, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    try:
        wait_for(lambda: count(db) >= len(expected), 300, "the rest of the stream")
        time.sleep(0.5)  # anything more would be a double
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert count(db) == len(expected)
    assert count(db, "SELECT sum(volume) FROM aggregates WHERE entity = '*'") == len(expected)
    assert count(db, "SELECT count(*) FROM mentions") == mentions(expected)
    assert count(db, "SELECT sum(volume) FROM aggregates WHERE entity != '*'") == mentions(expected)
    assert count(db, "SELECT sum(n) FROM rejects") == 2  # the two bad lines, counted once across the restart
    assert f"stored {len(expected)} documents (rejected: missing_timestamp 1, not_json 1)" in out


def test_standard_input_is_read_to_its_end(tmp_path, tiny_classifier):
    config = write_config(tmp_path, tiny_classifier, sources={"stdin": True})
    lines = [json.dumps(d) for d in docs(150)] + ["{broken", json.dumps(docs(1)[0])]
    proc = start(config, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate("\n".join(lines) + "\n", timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "stored 150 documents (rejected: not_json 1)" in out
    assert count(tmp_path / "state" / "monitor.db", "SELECT count(*) FROM alerts") >= 1


def test_listening_beyond_loopback_needs_keys(tmp_path):
    config = write_config(tmp_path, tmp_path / "no-model", http={"host": "0.0.0.0"})
    proc = start(config, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "refusing to listen on 0.0.0.0 without API keys" in err
    assert "Traceback" not in err


# ---- the HTTP side ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    tiny_classifier = request.getfixturevalue("tiny_classifier")
    tmp = tmp_path_factory.mktemp("monitor-http")
    config = write_config(tmp, tiny_classifier, http={"port": 0, "max_documents": 100, "max_body_bytes": 50_000})
    log = tmp / "monitor.log"
    proc = start(config, env={"TUNELAB_API_KEYS": KEY}, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    url = None
    for line in proc.stdout:
        m = re.search(r"tunelab monitor on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    if url is None:
        proc.kill()
        raise RuntimeError(log.read_text()[-3000:])
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_ingest_is_keyed_limited_and_idempotent(site):
    batch = {"documents": docs(40, "h")}
    assert httpx.post(site + "/ingest", json=batch).status_code == 401
    r = httpx.post(site + "/ingest", content=json.dumps(batch), headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415
    assert httpx.post(site + "/ingest", json={"documents": docs(101, "big")}, headers=AUTH).status_code == 413
    assert httpx.post(site + "/ingest", content="x" * 60_000, headers={**AUTH, "Content-Type": "application/json"}
                      ).status_code == 413
    r = httpx.post(site + "/ingest", content="{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the body is not JSON")
    many = {f"X-H{i}": "v" for i in range(120)}
    assert httpx.post(site + "/ingest", json=batch, headers={**AUTH, **many}).status_code == 431
    r = httpx.post(site + "/ingest", json={"documents": batch["documents"] + [{"id": "bad", "text": "x"}]},
                   headers=AUTH)
    assert r.status_code == 200 and r.json() == {"stored": 40, "duplicates": 0, "rejected": 1,
                                                 "reasons": {"missing_timestamp": 1}}
    r = httpx.post(site + "/ingest", json=batch, headers=AUTH)  # a client retrying: nothing counted twice
    assert r.json() == {"stored": 0, "duplicates": 40, "rejected": 0, "reasons": {}}
    one = httpx.post(site + "/ingest", json={"id": "single", "timestamp": "2026-01-05T10:00:00Z",
                                             "text": "ACME alone"}, headers=AUTH)
    assert one.json()["stored"] == 1
    bare = httpx.post(site + "/ingest", json=[{"id": "listed", "timestamp": START, "text": "Globex listed"}],
                      headers=AUTH)
    assert bare.json()["stored"] == 1  # a bare list of documents is read too
    assert httpx.get(site + "/api/overview").status_code == 401
    view = httpx.get(site + "/api/overview", headers=AUTH).json()
    assert view["documents"] >= 41 and view["rejected"]["missing_timestamp"] >= 1
    assert {e["name"] for e in view["entities"]} >= {"ACME", "Globex"}
    series = httpx.get(site + "/api/series", params={"entity": "ACME", "windows": 5}, headers=AUTH).json()
    assert len(series) == 5 and sum(p["volume"] for p in series) >= 1
    metrics = httpx.get(site + "/metrics").text
    assert re.search(r'tunelab_monitor_documents_total\{outcome="stored"\} (\d+)', metrics)
    assert 'tunelab_monitor_alerts_total{entity="ACME",rule="busy"}' in metrics
    assert 'tunelab_rejections_total{reason="auth"}' in metrics


def _browser_or_skip():
    from test_playground import _browser_or_skip as check

    return check()


def test_dashboard_shows_entities_series_and_alerts(site, tmp_path):
    from test_playground import CHROMIUM

    sync_api = _browser_or_skip()
    burst = [{"id": f"dash{i}", "timestamp": START + 7200 + i, "text": f"ACME recall #{i}"} for i in range(10)]
    assert httpx.post(site + "/ingest", json={"documents": burst}, headers=AUTH).status_code == 200
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(site + "/")
        assert page.title() == "tunelab monitor"
        sync_api.expect(page.locator("#conn")).to_contain_text("401")  # the key is asked for
        page.fill("#key", KEY)
        page.click("#usekey")
        sync_api.expect(page.locator("#entities tr[data-entity='ACME']")).to_be_visible()
        sync_api.expect(page.locator("#alerts tr.alert").first).to_contain_text("busy")
        page.click("#entities tr[data-entity='ACME']")
        sync_api.expect(page.locator("#chart-title")).to_have_text("ACME")
        assert page.locator("#chart svg rect").count() >= 1
        sync_api.expect(page.locator("#chart .alert-mark").first).to_be_attached()
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        browser.close()
    assert errors == []
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
