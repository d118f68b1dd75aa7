"""The monitor's parts without models or processes: documents, watch-list matching, statistics, the store (SQLite
and PostgreSQL: idempotent ingest, aggregates, positions), rules on planted bursts and flat streams, the folder
reader, and webhooks that are down."""

from __future__ import annotations

import http.server
import json
import random
import socket
import threading
import time

import pytest

from tunelab.config import MonitorConfig, MonitorEntities, Webhook
from tunelab.errors import UserError
from tunelab.monitor.documents import Rejected, parse_document, parse_timestamp
from tunelab.monitor.scoring import EntityFinder
from tunelab.monitor.sources import FolderReader, Work
from tunelab.monitor.stats import Window, adwin_cut, count_z, page_hinkley, zscore
from tunelab.monitor.store import OVERALL, Deliveries, Store, Views, tables

START = 1767571200  # 2026-01-05 00:00 UTC
HOUR = 3600
WATCH = [{"name": "ACME", "aliases": ["@acme", "Acme Corp"]}, {"name": "Globex", "aliases": ["Globex Corp"]},
         {"name": "腾讯", "aliases": ["Tencent", "腾讯控股"]}]


# ---- documents ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, reason", [
    ([1, 2], "not_an_object"),
    ({"timestamp": 1, "text": "x"}, "missing_id"),
    ({"id": " ", "timestamp": 1, "text": "x"}, "missing_id"),
    ({"id": "a" * 201, "timestamp": 1, "text": "x"}, "id_too_long"),
    ({"id": "a", "text": "x"}, "missing_timestamp"),
    ({"id": "a", "timestamp": "next tuesday", "text": "x"}, "bad_timestamp"),
    ({"id": "a", "timestamp": float("nan"), "text": "x"}, "bad_timestamp"),
    ({"id": "a", "timestamp": True, "text": "x"}, "bad_timestamp"),
    ({"id": "a", "timestamp": 1e20, "text": "x"}, "bad_timestamp"),
    ({"id": "a", "timestamp": 1, "text": "  "}, "missing_text"),
    ({"id": "a", "timestamp": 1, "text": 5}, "missing_text"),
    ({"id": "a", "timestamp": 1, "text": "x" * 101}, "text_too_long"),
])
def test_a_bad_document_is_refused_with_its_reason(raw, reason):
    with pytest.raises(Rejected) as err:
        parse_document(raw, "test", max_text_chars=100)
    assert err.value.reason == reason


def test_timestamps_and_fields():
    assert parse_timestamp("2026-01-05T00:00:00Z") == START
    assert parse_timestamp("2026-01-05T08:00:00+08:00") == START
    assert parse_timestamp("2026-01-05 00:00:00") == START  # no zone: UTC
    assert parse_timestamp(START * 1000) == START  # milliseconds
    assert parse_timestamp(str(START)) == START
    doc = parse_document({"key": 7, "when": START, "body": "bad \ud800 news\x00", "feed": " wire "}, "default",
                         {"id": "key", "timestamp": "when", "text": "body", "source": "feed"})
    assert (doc.id, doc.ts, doc.source, doc.text) == ("7", START, "wire", "bad \ufffd news")
    assert parse_document({"id": "x", "timestamp": 1, "text": "t"}, "default").source == "default"


# ---- entities -------------------------------------------------------------------------------------------------
def test_watchlist_matches_whole_words_tickers_in_capitals_and_chinese_inside_sentences():
    find = EntityFinder(MonitorEntities(watchlist=WATCH))
    texts = ["ACME beats estimates", "acme is a word here", "ACMEX is another ticker", "@acme why", "Globex corp!",
             "Acme Corp ships", "腾讯控股今日股价大跌", "Tencent and ACME", "nothing here"]
    assert find(texts) == [["ACME"], [], [], ["ACME"], ["Globex"], ["ACME"], ["腾讯"], ["ACME", "腾讯"], []]


# ---- statistics ----------------------------------------------------------------------------------------------
def test_zscore_counts_by_exact_tails_and_shares_by_the_binomial():
    from scipy.stats import norm, poisson

    flat = [Window(i, 100, 10, 0.0) for i in range(24)]
    assert zscore(Window(99, 100, 10, 0.0), flat, "negatives") == 0
    assert 4.5 < zscore(Window(99, 120, 30, 0.0), flat, "negatives") < 5.5  # tail 7e-7
    # at small counts the exact tail, not (x - mean) / sd: 6 against a steady 1.4 is about 2.6, not 3.9
    small = [1.4] * 24
    assert count_z(6, small) == pytest.approx(norm.isf(poisson.sf(5, 1.4)), abs=0.15)
    assert count_z(6, [0, 0, 0, 5, 0, 0, 0, 6] * 3) < count_z(6, small)  # over-dispersed: less surprising
    assert zscore(Window(99, 100, 30, 0.0), flat, "share_negative") == pytest.approx(0.2 / (0.09 / 100) ** 0.5)
    assert zscore(Window(99, 0, 0, 0.0), flat, "share_negative") is None
    assert count_z(5, [0] * 24) > 4  # five where there was nothing


def test_change_detectors_see_a_step_and_not_noise():
    rng = random.Random(0)
    noise = [0.3 + rng.uniform(-0.05, 0.05) for _ in range(30)]
    assert page_hinkley(noise, 0.01) < 0.3
    assert page_hinkley(noise + [0.7, 0.75, 0.7], 0.01) > 1.0
    flat = [Window(i, 50, 15 + rng.randint(-3, 3), 0.0) for i in range(20)]
    assert adwin_cut(flat, "share_negative", 0.002) is None
    cut = adwin_cut(flat + [Window(20, 50, 40, 0.0), Window(21, 50, 42, 0.0)], "share_negative", 0.002)
    assert cut is not None and cut[0] == 20 and cut[1] > 0.4


# ---- the store and the rules ----------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'monitor.db'}"
    from sqlalchemy import create_engine

    url = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    tables().drop_all(engine)  # a clean database for each test
    engine.dispose()
    return url


SCORED: list[str] = []


def keyword_scorer(texts):
    """A test double for the sentiment model: 'awful' is negative."""
    SCORED.extend(texts)
    return [("negative", True, -0.9) if "awful" in t else ("positive", False, 0.8) for t in texts]


def stream(hours: int, per_hour: int, seed: int = 0, start_hour: int = 0):
    """Documents about Acme and Globex, a fifth of them negative, spread over `hours`."""
    rng = random.Random(seed)
    out = []
    for h in range(start_hour, start_hour + hours):
        for k in range(per_hour):
            who = rng.choice(["ACME", "Globex", "the market"])
            mood = "awful" if rng.random() < 0.2 else "fine"
            out.append({"id": f"s{seed}-{h}-{k}", "timestamp": START + h * HOUR + k * HOUR / per_hour,
                        "text": f"{who} looks {mood} today #{h}-{k}"})
    return out


def monitor_cfg(tmp_path, url: str, **over) -> MonitorConfig:
    raw = {"state": str(tmp_path / "state"), "database": url, "window_s": HOUR, "sentiment": {"model": "unused"},
           "entities": {"watchlist": WATCH}, "http": {"enabled": False}, "max_batch": 50,
           "rules": [{"name": "burst", "kind": "zscore", "metric": "negatives", "above": 4, "min_volume": 5}]}
    return MonitorConfig.model_validate({**raw, **over})


@pytest.fixture
def make_monitor(tmp_path):
    from tunelab.monitor.service import Monitor

    made = []

    def make(url: str, **over):
        m = Monitor(monitor_cfg(tmp_path, url, **over), score=keyword_scorer,
                    find=EntityFinder(MonitorEntities(watchlist=WATCH)))
        made.append(m)
        return m

    yield make
    for m in made:
        m.store.close()


def feed(monitor, docs, chunk: int = 50) -> list[dict]:
    return [c for i in range(0, len(docs), chunk)
            for c in monitor.pipeline.process([Work(docs[i:i + chunk], "test")])]


def totals(monitor) -> dict:
    from sqlalchemy import func, select

    t = monitor.store.t
    with monitor.store.db.read() as conn:
        return {"documents": conn.execute(select(func.count()).select_from(t["documents"])).scalar(),
                "volume": conn.execute(select(func.sum(t["aggregates"].c.volume))
                                       .where(t["aggregates"].c.entity == OVERALL)).scalar(),
                "mentions": conn.execute(select(func.count()).select_from(t["mentions"])).scalar()}


def test_ingest_is_idempotent_and_counts_rejects(make_monitor, db_url):
    m = make_monitor(db_url)
    docs = stream(6, 40)
    first = feed(m, docs + [{"id": "bad", "timestamp": "soon", "text": "x"}, docs[0]])
    assert sum(c["stored"] for c in first) == len(docs)
    assert sum(c["duplicates"] for c in first) == 1 and sum(c["rejected"] for c in first) == 1
    before = totals(m)
    SCORED.clear()
    again = feed(m, docs, chunk=77)  # a replay, batched otherwise: nothing scored again, nothing counted twice
    assert SCORED == []
    assert sum(c["stored"] for c in again) == 0 and sum(c["duplicates"] for c in again) == len(docs)
    assert totals(m) == before and before["documents"] == before["volume"] == len(docs)
    view = Views(m.store).overview()
    assert view["rejected"] == {"bad_timestamp": 1}
    acme = next(e for e in view["entities"] if e["name"] == "ACME")
    assert acme["volume"] == sum("ACME" in d["text"] for d in docs)


def test_rules_fire_on_a_planted_burst_once_and_not_on_a_flat_stream(make_monitor, db_url):
    m = make_monitor(db_url, rules=[
        {"name": "burst", "kind": "zscore", "metric": "negatives", "above": 4, "min_volume": 5, "cooldown_windows": 6},
        {"name": "share", "kind": "adwin", "metric": "share_negative", "delta": 0.002, "min_volume": 5,
         "entities": "overall"}])
    flat = stream(48, 30)
    assert sum(len(c) for c in [feed(m, flat)]) and Views(m.store).alerts() == []
    burst = [{"id": f"b{k}", "timestamp": START + 48 * HOUR + 60 * k, "text": f"ACME is awful, recall #{k}"}
             for k in range(25)]
    feed(m, burst + stream(1, 30, seed=1, start_hour=48))
    alerts = Views(m.store).alerts()
    assert [(a["rule"], a["entity"], a["window"]) for a in alerts if a["rule"] == "burst"] == [
        ("burst", "ACME", START + 48 * HOUR)]
    again = [{"id": f"c{k}", "timestamp": START + 49 * HOUR + 60 * k, "text": f"ACME awful again #{k}"}
             for k in range(25)]
    feed(m, again)  # within the cool-down: no second alert
    assert len([a for a in Views(m.store).alerts() if a["rule"] == "burst"]) == 1


def test_a_monitor_just_started_does_not_alert_without_a_baseline(make_monitor, db_url):
    m = make_monitor(db_url)
    feed(m, [{"id": f"b{k}", "timestamp": START + k, "text": "ACME awful"} for k in range(40)])
    assert Views(m.store).alerts() == []


# ---- the folder reader ----------------------------------------------------------------------------------------
def test_folder_reads_new_files_appended_lines_and_waits_for_a_line_to_end(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'm.db'}", HOUR)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    reader = FolderReader(inbox, ["*.jsonl", "*.csv"], store, max_docs=10)

    def commit(works):
        for w in works:
            store.ingest([], {}, [w.position])
            reader.committed(w)
        return [i for w in works for i in w.items]

    f = inbox / "a.jsonl"
    f.write_text('{"id": "1"}\n{"id": "2"}\n{"id": "3", "tex', encoding="utf-8")
    assert [d["id"] for d in commit(reader.poll())] == ["1", "2"]
    with open(f, "a", encoding="utf-8") as out:
        out.write('t": "x"}\nnot json\n')
    got = commit(reader.poll())
    assert got[0]["id"] == "3" and isinstance(got[1], Rejected) and got[1].reason == "not_json"
    assert reader.poll() == []
    with open(f, "a", encoding="utf-8") as out:  # a line over 1 MiB is one rejected document; the next is read
        out.write('{"id": "huge", "text": "' + "x" * (1 << 20) + '"}\n{"id": "4"}\n')
    got = commit(reader.poll()) + commit(reader.poll())
    assert [getattr(g, "reason", None) or g["id"] for g in got] == ["line_too_long", "4"]
    (inbox / "c.jsonl").write_text('{"id": "' + "y" * (1 << 20) + '"}\n{"id": "5"}\n', encoding="utf-8")
    got = commit(reader.poll()) + commit(reader.poll())  # an over-long first line too
    assert [getattr(g, "reason", None) or g["id"] for g in got] == ["line_too_long", "5"]
    (inbox / "b.csv").write_text('id,text\n1,"a ""quoted""\nline"\n2,plain\n3,"still open\n', encoding="utf-8")
    assert commit(reader.poll()) == [{"id": "1", "text": 'a "quoted"\nline'}, {"id": "2", "text": "plain"}]
    # a new reader (a restart) resumes from the stored positions; a file replaced under its name is read again
    reader = FolderReader(inbox, ["*.jsonl", "*.csv"], store, max_docs=10)
    assert reader.poll() == []
    f.write_text('{"id": "new"}\n', encoding="utf-8")
    assert [d["id"] for d in commit(reader.poll())] == ["new"]
    store.close()


# ---- webhooks -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):  # noqa: N802 - the handler's name
        _Receiver.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_down_retries_with_backoff_and_never_slows_ingest(make_monitor, tmp_path):
    from tunelab.monitor.alerts import Dispatcher

    port = _free_port()
    hook = {"url": f"http://127.0.0.1:{port}/alerts", "timeout_s": 2, "max_attempts": 5}
    m = make_monitor(f"sqlite:///{tmp_path / 'w.db'}", alerts={"webhooks": [hook]},
                     rules=[{"name": "busy", "kind": "threshold", "metric": "volume", "above": 5, "min_volume": 1}])
    stop = threading.Event()
    dispatcher = Dispatcher(Deliveries(m.store), [Webhook(**hook)], HOUR, stop, m.metrics, tick_s=0.05)
    dispatcher.start()
    try:
        t0 = time.monotonic()
        feed(m, stream(3, 20))
        assert time.monotonic() - t0 < 30  # stored while nothing listens at the webhook
        alerts = Views(m.store).alerts()
        assert alerts
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the first attempts fail: the deliveries wait, pending
            rows = _deliveries(m)
            if rows and all(r["attempts"] >= 1 for r in rows):
                break
            time.sleep(0.05)
        assert rows and all(r["status"] == "pending" and r["attempts"] >= 1 and r["last_error"] for r in rows)
        _Receiver.got = []
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(r["status"] != "delivered" for r in _deliveries(m)):
                time.sleep(0.1)
        finally:
            server.shutdown()
        assert all(r["status"] == "delivered" for r in _deliveries(m))
        assert sorted(b["alert"]["id"] for b in _Receiver.got) == sorted(a["id"] for a in alerts)
        assert {b["alert"]["rule"] for b in _Receiver.got} == {"busy"}
    finally:
        stop.set()
        dispatcher.join(5)


def _deliveries(m) -> list[dict]:
    from sqlalchemy import select

    with m.store.db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(m.store.t["deliveries"]))]


def test_config_errors_name_the_key(tmp_path):
    from tunelab.config import load_monitor_config

    p = tmp_path / "m.yaml"
    p.write_text("sentiment: {model: x}\nrules:\n  - {name: r, kind: zscore}\n", encoding="utf-8")
    with pytest.raises(UserError, match="needs `above` or `below`"):
        load_monitor_config(p)
    p.write_text("sentiment: {model: x}\nrules:\n  - {name: r, kind: adwin, metric: volume}\n", encoding="utf-8")
    with pytest.raises(UserError, match="bounded metric"):
        load_monitor_config(p)


# ---- scoring with real (tiny) models ---------------------------------------------------------------------------
def test_sentiment_and_ner_score_alike_from_a_model_dir_and_its_onnx_export(tiny_classifier, classifier_onnx,
                                                                               tiny_ner):
    from tunelab.config import MonitorSentiment
    from tunelab.monitor.scoring import SentimentScorer

    texts = ["great wonderful happy day", "awful terrible bad service", "the meeting is at noon",
             "Goldman Sachs hired John Smith"]
    torch_scores = SentimentScorer(MonitorSentiment(model=str(tiny_classifier)))(texts)
    onnx_scores = SentimentScorer(MonitorSentiment(model=str(classifier_onnx)))(texts)
    assert [s[:2] for s in torch_scores] == [s[:2] for s in onnx_scores]
    assert all(abs(a[2] - b[2]) < 1e-3 and -1 <= a[2] <= 1 for a, b in zip(torch_scores, onnx_scores))
    with pytest.raises(UserError, match="serves 'entities', not 'classify'"):
        SentimentScorer(MonitorSentiment(model=str(tiny_ner)))
    with pytest.raises(UserError, match="not a label of the model"):
        SentimentScorer(MonitorSentiment(model=str(tiny_classifier), negative_label="bad"))
    # the NER model's names count too, mapped to the watch-list's name when they are one of its aliases
    find = EntityFinder(MonitorEntities(watchlist=[{"name": "Silverspring", "aliases": ["Silverspring Energy"]}],
                                        ner_model=str(tiny_ner), ner_types=["PER"]))
    (found,) = find(["Shares of Silverspring Energy fell 4% after Tom Novak, its chief executive, resigned."])
    assert found == ["Silverspring", "Tom Novak"]


def test_the_example_config_validates():
    from pathlib import Path

    from tunelab.config import load_monitor_config

    cfg = load_monitor_config(Path(__file__).parent.parent / "examples" / "monitor" / "monitor.yaml")
    assert cfg.sources.folder is not None and [r.name for r in cfg.rules][0] == "negative-burst"
    assert cfg.sentiment.model.endswith("runs/monitor-demo/sentiment/model")


def test_a_stranger_s_mistakes_are_one_clear_error(tmp_path):
    from tunelab.config import MonitorSentiment
    from tunelab.monitor.demo import prepare_demo
    from tunelab.monitor.scoring import SentimentScorer

    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(UserError, match="is not a monitor demo folder"):
        prepare_demo(mine, None, print)
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "mine"
    with pytest.raises(UserError):
        SentimentScorer(MonitorSentiment(model=str(tmp_path / "no-such-model")))
