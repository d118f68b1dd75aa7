"""The monitor on a replayed real stream: ingest throughput, and alert quality on injected negative bursts.

Data: the built-in tweets in the demo's seeded order (`tunelab monitor demo`): the first 3,000 train the sentiment
model (MiniLM, two epochs: the demo's, reused from `runs/monitor-demo/sentiment/model` or trained here), the rest
are the stream; the watch-list is the demo's (airlines, Apple, Google, Uber with handles and tickers). The stream is
the first `--stream-docs` of the rest; per entity, up to 200 of the later tweets labelled negative that mention it
(and no other watched name) are the burst pool.

1. Throughput, end to end (`tunelab monitor`'s folder source -> documents checked -> sentiment + watch-list ->
   SQLite (WAL, synchronous=FULL) with aggregates and rules): the batched pipeline (64 documents per forward and per
   transaction) against a loop scoring and committing one document at a time (`max_batch: 1`), same model, same
   precision (fp32), same rows (`--throughput-docs`; the one-at-a-time arm on the first `--single-docs` of them);
   and where the time goes: the model's forward alone and the rest of the pipeline alone, each batched and not.
2. Alert quality with the demo's `negative-burst` rule (z-score of the entity's negative documents per window against
   the 24 windows before, >= 4, at least 5 documents, 6 windows of cool-down): the stream (`--stream-docs`, 120
   documents per hourly window) replayed with bursts of 10, 20 and 40 extra negative documents for one entity inside
   one window (`--trials` per size, entities and windows drawn with seed 0, at least 30 windows apart for the same
   entity), and once without. Detection rate per size, time to alert (stream minutes and burst documents from the
   burst's first document to the batch that raised the alert), false alarms per 10,000 documents on the stream
   without bursts. The model's label of each distinct text is computed once and reused by every replay (the rules,
   the store and the pipeline run for real each time).

Run alone (2 cores): `python benchmarks/monitor.py` (~10 min) -> benchmarks/results/monitor.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import MonitorConfig, MonitorEntities, MonitorSentiment  # noqa: E402
from tunelab.artifacts import kind_of  # noqa: E402
from tunelab.monitor import demo  # noqa: E402
from tunelab.monitor.scoring import EntityFinder, SentimentScorer  # noqa: E402
from tunelab.monitor.service import Monitor  # noqa: E402
from tunelab.monitor.sources import Work  # noqa: E402
from tunelab.monitor.store import Views  # noqa: E402

WINDOW_S, PER_WINDOW, BASELINE, COOLDOWN = 3600, 120, 24, 6
RULE = dict(demo.RULES[0])
SIZES = (10, 20, 40)


def config(state: Path, model: Path, max_batch: int, folder: Path | None = None) -> MonitorConfig:
    return MonitorConfig.model_validate({
        "state": str(state), "window_s": WINDOW_S, "sentiment": {"model": str(model)},
        "entities": {"watchlist": demo.WATCHLIST}, "http": {"enabled": False}, "max_batch": max_batch,
        "sources": {"folder": {"path": str(folder), "poll_s": 0.05}} if folder else {}, "rules": [RULE]})


def documents(rows: list[dict], start: float = demo.START) -> list[dict]:
    span = WINDOW_S / PER_WINDOW
    return [{"id": f"t{r['row']}", "timestamp": start + i * span, "source": "twitter", "text": r["text"]}
            for i, r in enumerate(rows)]


def throughput(model: Path, rows: list[dict], max_batch: int, work: Path) -> dict:
    """Docs/s of `tunelab monitor`'s folder source -> pipeline -> SQLite, from the start to the last commit."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "inbox").mkdir(parents=True)
    cfg = config(work / "state", model, max_batch, work / "inbox")
    monitor = Monitor(cfg)
    inbox = work / "inbox" / "stream.jsonl"
    monitor.start()
    t0 = time.perf_counter()
    inbox.write_text("".join(json.dumps(d) + "\n" for d in documents(rows)), encoding="utf-8")
    size = inbox.stat().st_size
    while (monitor.store.position(str(inbox.resolve())) or (0, ""))[0] < size:
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    stored = Views(monitor.store).overview()["documents"]
    monitor.stop()
    assert stored == len(rows), (stored, len(rows))
    return {"documents": len(rows), "seconds": round(seconds, 2), "docs_per_s": round(len(rows) / seconds, 1),
            "max_batch": max_batch}


def components(model: Path, rows: list[dict], find, work: Path) -> dict:
    """Where the time goes, ms per document: the sentiment forward alone (64 texts per call vs one) and the rest of
    the pipeline with the model's labels looked up (store, aggregates, rules, commit: 64 per transaction vs one);
    and the one-at-a-time arm without the folder source and its threads (a plain loop calling the pipeline)."""
    score = SentimentScorer(MonitorSentiment(model=str(model)))
    texts = [r["text"] for r in rows]
    score(texts[:64])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(texts), 64):
        score(texts[i:i + 64])
    batched = (time.perf_counter() - t0) / len(texts)
    t0 = time.perf_counter()
    for t in texts[:200]:
        score([t])
    single = (time.perf_counter() - t0) / 200
    cached = CachedScorer(score, texts)
    out = {"model_forward_ms": {"batched": round(batched * 1000, 2), "one_at_a_time": round(single * 1000, 2)}}
    docs = documents(rows)
    shutil.rmtree(work / "loop", ignore_errors=True)
    monitor = Monitor(config(work / "loop", Path("unused"), 1), score=score, find=find)
    t0 = time.perf_counter()
    for d in docs[:200]:  # the plain loop: no source, no queue, no threads; read, score, store, commit, next
        monitor.pipeline.process([Work([d], "bench")])
    out["plain_loop_docs_per_s"] = round(200 / (time.perf_counter() - t0), 1)
    monitor.store.close()
    for name, size, n in (("batched", 64, len(docs)), ("one_at_a_time", 1, 200)):
        shutil.rmtree(work / name, ignore_errors=True)
        monitor = Monitor(config(work / name, Path("unused"), size), score=cached, find=find)
        t0 = time.perf_counter()
        for i in range(0, n, size):
            monitor.pipeline.process([Work(docs[i:i + size], "bench")])
        out.setdefault("store_rules_commit_ms", {})[name] = round((time.perf_counter() - t0) / n * 1000, 2)
        monitor.store.close()
    for part in (out["model_forward_ms"], out["store_rules_commit_ms"]):
        part["ratio"] = round(part["one_at_a_time"] / part["batched"], 2)
    return out


class CachedScorer:
    """The model's (label, negative, score) per distinct text, computed once (batched) and looked up after."""

    def __init__(self, scorer: SentimentScorer, texts: list[str]):
        unique = list(dict.fromkeys(texts))
        self.table = dict(zip(unique, scorer(unique)))

    def __call__(self, texts: list[str]):
        return [self.table[t] for t in texts]


def plan_bursts(entities: list[str], windows: int, trials: int, rng: random.Random) -> list[tuple[str, int]]:
    """(entity, window index) pairs, windows after the baseline, the same entity's at least 30 windows apart."""
    slots = [(e, w) for e in entities for w in range(BASELINE + 2, windows - 1, BASELINE + COOLDOWN)]
    rng.shuffle(slots)
    return slots[:trials]


def replay(model_score, find, stream: list[dict], bursts: dict, state: Path) -> dict:
    """One replay through the pipeline in batches of 64 in time order -> alerts, and per burst when it alerted."""
    shutil.rmtree(state, ignore_errors=True)
    cfg = config(state, Path("unused"), 64)
    monitor = Monitor(cfg, score=model_score, find=find)
    docs = sorted(stream + [d for b in bursts.values() for d in b["docs"]], key=lambda d: d["timestamp"])
    raised = {}
    seen = 0
    for i in range(0, len(docs), 64):
        batch = docs[i:i + 64]
        monitor.pipeline.process([Work(batch, "replay")])
        alerts = Views(monitor.store).alerts(1000)
        for a in alerts[: len(alerts) - seen]:
            raised[a["id"]] = {**a, "at_ts": batch[-1]["timestamp"]}
        seen = len(alerts)
    monitor.store.close()
    detected, delays, burst_docs_needed = 0, [], []
    matched = set()
    for key, b in bursts.items():
        hit = [a for a in raised.values() if a["entity"] == b["entity"] and a["window"] == b["window"]]
        if hit:
            detected += 1
            matched.add(hit[0]["id"])
            first = min(d["timestamp"] for d in b["docs"])
            delays.append((hit[0]["at_ts"] - first) / 60)
            burst_docs_needed.append(sum(d["timestamp"] <= hit[0]["at_ts"] for d in b["docs"]))
    others = [a for a in raised.values() if a["id"] not in matched]
    return {"alerts": len(raised), "detected": detected, "bursts": len(bursts), "delays_min": delays,
            "burst_docs_at_alert": burst_docs_needed, "other_alerts": len(others),
            "other_examples": [a["message"] for a in others[:5]]}


def quantiles(xs: list[float]) -> dict:
    if not xs:
        return {}
    xs = sorted(xs)
    return {"median": round(xs[len(xs) // 2], 1), "p90": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 1),
            "max": round(xs[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path("runs/monitor-demo/sentiment/model"))
    ap.add_argument("--throughput-docs", type=int, default=2000)
    ap.add_argument("--single-docs", type=int, default=400)
    ap.add_argument("--stream-docs", type=int, default=30000)
    ap.add_argument("--trials", type=int, default=100)
    args = ap.parse_args()
    rows = demo._tweets()
    model = args.model
    work = Path(tempfile.mkdtemp(prefix="tunelab-monitor-bench-"))
    if kind_of(model) != "model":
        model = demo.train_model(rows[:demo.TRAIN_ROWS], work / "demo-model", print)
    rest = rows[demo.TRAIN_ROWS:]
    stream_rows, tail = rest[:args.stream_docs], rest[args.stream_docs:]
    find = EntityFinder(MonitorEntities(watchlist=demo.WATCHLIST))
    pools = {w["name"]: [] for w in demo.WATCHLIST}  # burst material: tweets after the stream, never in it
    for r, ents in zip(tail, find([r["text"] for r in tail])):
        if r["label"] == "negative" and len(ents) == 1 and len(pools[ents[0]]) < 200:
            pools[ents[0]].append(r)

    print("throughput: batched …", flush=True)
    batched = throughput(model, stream_rows[:args.throughput_docs], 64, work / "batched")
    print(f"  {batched}\nthroughput: one at a time …", flush=True)
    single = throughput(model, stream_rows[:args.single_docs], 1, work / "single")
    print(f"  {single}", flush=True)
    breakdown = components(model, stream_rows[:640], find, work / "components")
    print(f"  breakdown: {breakdown}", flush=True)

    stream = documents(stream_rows)
    windows = len(stream) // PER_WINDOW
    burst_entities = [e for e, pool in pools.items() if len(pool) >= max(SIZES)]
    t0 = time.perf_counter()
    score = CachedScorer(SentimentScorer(MonitorSentiment(model=str(model))),
                         [d["text"] for d in stream] + [r["text"] for p in pools.values() for r in p])
    scoring_s = time.perf_counter() - t0
    print(f"scored {len(score.table)} distinct texts in {scoring_s:.0f} s; replaying …", flush=True)
    clean = replay(score, find, stream, {}, work / "clean")
    per_size = {}
    for size in SIZES:
        rng = random.Random(size)
        merged = {"bursts": 0, "detected": 0, "delays_min": [], "burst_docs_at_alert": [], "other_alerts": 0,
                  "other_examples": []}
        round_ = 0
        while merged["bursts"] < args.trials:  # as many replays as the trials need (a replay holds ~48 bursts)
            bursts = {}
            for k, (entity, w) in enumerate(plan_bursts(burst_entities, windows, args.trials - merged["bursts"],
                                                        rng)):
                start = demo.START + w * WINDOW_S
                picked = rng.sample(pools[entity], size)
                bursts[k] = {"entity": entity, "window": start, "docs": [
                    {"id": f"burst-{size}-{round_}-{k}-{j}", "timestamp": start + rng.random() * WINDOW_S,
                     "source": "burst", "text": r["text"]} for j, r in enumerate(picked)]}
            r = replay(score, find, stream, bursts, work / f"burst-{size}")
            for key in ("bursts", "detected", "other_alerts"):
                merged[key] += r[key]
            for key in ("delays_min", "burst_docs_at_alert", "other_examples"):
                merged[key] += r[key]
            round_ += 1
        per_size[size] = {"trials": merged["bursts"], "replays": round_, "detected": merged["detected"],
                          "detection_rate": round(merged["detected"] / merged["bursts"], 3),
                          "minutes_to_alert": quantiles(merged["delays_min"]),
                          "burst_docs_at_alert": quantiles(merged["burst_docs_at_alert"]),
                          "other_alerts": merged["other_alerts"], "other_examples": merged["other_examples"][:5]}
        print(f"  burst {size}: {per_size[size]}", flush=True)
    false_per_10k = clean["alerts"] / len(stream) * 10_000
    result = {
        "model": str(model), "rule": RULE, "window_s": WINDOW_S, "documents_per_window": PER_WINDOW,
        "throughput": {"batched": batched, "one_at_a_time": single,
                       "speedup": round(batched["docs_per_s"] / single["docs_per_s"], 2),
                       "speedup_vs_plain_loop": round(batched["docs_per_s"] / breakdown["plain_loop_docs_per_s"], 2),
                       "target": 5.0, "breakdown": breakdown},
        "alert_quality": {
            "stream_documents": len(stream), "windows": windows, "burst_entities": burst_entities,
            "scoring_seconds_once": round(scoring_s, 1), "per_size": per_size,
            "clean_stream": {"alerts": clean["alerts"], "false_alarms_per_10k": round(false_per_10k, 2),
                             "examples": clean["other_examples"]},
            "target": {"detection_at_20": 0.95, "max_false_alarms_per_10k": 1.0},
            "met": per_size[20]["detection_rate"] >= 0.95 and false_per_10k <= 1.0}}
    print(json.dumps(result["throughput"], indent=1), json.dumps(result["alert_quality"]["clean_stream"]))
    print("wrote", write_result("monitor", result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
