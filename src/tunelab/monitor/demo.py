"""`tunelab monitor demo`: the built-in tweets replayed as a timestamped stream of company mentions, with a negative
burst injected for one company, through the real monitor (folder source, scoring, storage, rules) — offline, in a
few minutes on a laptop CPU.

1. A sentiment model: `--model DIR`, else MiniLM fine-tuned for two epochs on 3,000 of the tweets (kept in the demo
   folder and reused).
2. The stream: 6,000 other tweets over 48 hourly windows (Unix time from 2026-01-05 00:00 UTC), written to
   `inbox/tweets.jsonl` with two malformed lines; the burst: 30 negative tweets about the target company (held out
   of the stream) inside window 40, in `inbox/breaking.csv`.
3. The monitor's config, `monitor.yaml` in the demo folder (rerun it with `tunelab monitor run`), is run until both
   files are read; the alerts and the per-company table are printed, then the dashboard is served (`--no-serve`:
   not).
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import yaml

from tunelab.artifacts import kind_of
from tunelab.assets import builtin_path
from tunelab.errors import UserError
from tunelab.terminal import plain

WATCHLIST = [
    {"name": "United Airlines", "aliases": ["@united", "United", "UAL"]},
    {"name": "American Airlines", "aliases": ["@AmericanAir", "American Airlines", "AAL"]},
    {"name": "US Airways", "aliases": ["@USAirways", "US Airways"]},
    {"name": "Southwest", "aliases": ["@SouthwestAir", "Southwest Airlines", "LUV"]},
    {"name": "JetBlue", "aliases": ["@JetBlue", "JBLU"]},
    {"name": "Virgin America", "aliases": ["@VirginAmerica"]},
    {"name": "Delta", "aliases": ["@Delta", "Delta Air Lines", "DAL"]},
    {"name": "Apple", "aliases": ["@apple", "iPhone", "iPad", "AAPL"]},
    {"name": "Google", "aliases": ["@google", "GOOG"]},
    {"name": "Uber", "aliases": ["@Uber"]},
]
RULES = [
    {"name": "negative-burst", "kind": "zscore", "metric": "negatives", "above": 3.5, "min_volume": 5,
     "baseline_windows": 24, "cooldown_windows": 6, "entities": "watchlist"},
    {"name": "mostly-negative", "kind": "threshold", "metric": "share_negative", "above": 0.9, "min_volume": 30,
     "entities": "watchlist"},
]
START = 1767571200  # 2026-01-05 00:00:00 UTC
WINDOWS, WINDOW_S, BURST_WINDOW = 48, 3600, 40
TRAIN_ROWS, STREAM_ROWS, BURST_SIZE, TARGET = 3000, 6000, 30, "Apple"
MARKER = "monitor-demo.json"


def _tweets() -> list[dict]:
    with open(builtin_path("builtin:tweets-sentiment"), encoding="utf-8", errors="replace", newline="") as f:
        rows = [{"text": r["text"], "label": r["sentiment"], "row": i} for i, r in enumerate(csv.DictReader(f))]
    random.Random(0).shuffle(rows)
    return rows


def train_model(rows: list[dict], out: Path, say, epochs: int = 2, eval_rows: int = 300,
                name: str = "monitor-demo") -> Path:
    """MiniLM fine-tuned on `rows` ({text, label}) into `out`/sentiment (the data prepared in `out`/data) -> its
    model dir (with its drift profile of up to `eval_rows` validation rows)."""
    from tunelab.config import PrepareOptions, validate
    from tunelab.data.prepare import prepare
    from tunelab.train.loop import train

    out.mkdir(parents=True, exist_ok=True)
    raw = out / "train.jsonl"
    raw.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows),
                   encoding="utf-8")
    say(f"fine-tuning MiniLM on {len(rows)} tweets for the sentiment model of {name} (once)")
    prepare(str(raw), out / "data", PrepareOptions(seed=0), overwrite=True)
    cfg = validate({"task": "classification", "name": name,
                    "model": {"base": "builtin:minilm-l6", "max_length": 64},
                    "data": {"dir": str(out / "data"), "max_eval_examples": eval_rows},
                    "method": {"name": "full"},
                    "train": {"epochs": epochs, "batch_size": 32, "lr": 8e-5, "warmup_ratio": 0.06, "eval_every": 0,
                              "seed": 0}})
    train(cfg, out / "sentiment", show_progress=False, overwrite=True)
    return out / "sentiment" / "model"


def _mentions(text: str) -> set[str]:
    from tunelab.config import MonitorEntities
    from tunelab.monitor.scoring import EntityFinder

    global _FINDER
    if _FINDER is None:
        _FINDER = EntityFinder(MonitorEntities(watchlist=WATCHLIST))
    return set(_FINDER([text])[0])


_FINDER = None


def write_stream(rows: list[dict], inbox: Path) -> dict:
    """The stream (tweets.jsonl, two malformed lines among them) and the burst (breaking.csv) -> what was written."""
    rng = random.Random(1)
    burst = [r for r in rows if r["label"] == "negative" and TARGET in _mentions(r["text"])][:BURST_SIZE]
    held = {r["row"] for r in burst}
    stream = [r for r in rows if r["row"] not in held][:STREAM_ROWS]
    span = WINDOWS * WINDOW_S / len(stream)
    lines = [json.dumps({"id": f"tweet-{r['row']}", "timestamp": round(START + i * span + rng.random() * span, 3),
                         "source": "twitter", "text": r["text"]}, ensure_ascii=False) for i, r in enumerate(stream)]
    lines.insert(100, '{"id": "broken-1", "timestamp": "next tuesday", "text": "a timestamp nobody can read"}')
    lines.insert(200, "this line is not JSON")
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "tweets.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(inbox / "breaking.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "timestamp", "source", "text"])
        for k, r in enumerate(burst):
            ts = START + BURST_WINDOW * WINDOW_S + rng.random() * WINDOW_S
            w.writerow([f"burst-{k}", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)), "newswire", r["text"]])
    return {"stream": len(stream), "burst": len(burst), "target": TARGET}


def prepare_demo(out: Path, model: Path | None, say) -> tuple[Path, dict]:
    """The demo folder at `out` (a folder of another kind is refused): model, inbox, config -> (config path, info)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"{out} exists and is not a monitor demo folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"kind": "monitor-demo"}) + "\n", encoding="utf-8")
    rows = _tweets()
    if model is None:
        model = out / "sentiment" / "model"
        if kind_of(model) != "model":
            model = train_model(rows[:TRAIN_ROWS], out, say)
        else:
            say(plain(f"using the demo's sentiment model at {model}"))
    for old in ("state", "inbox"):  # the demo's own stream and database, replayed from scratch
        shutil.rmtree(out / old, ignore_errors=True)
    info = write_stream(rows[TRAIN_ROWS:], out / "inbox")
    config = {"state": "./state", "window_s": WINDOW_S, "sentiment": {"model": str(Path(model).resolve())},
              "entities": {"watchlist": WATCHLIST}, "sources": {"folder": {"path": "./inbox", "poll_s": 0.5}},
              "http": {"port": 8100}, "rules": RULES}
    path = out / "monitor.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path, info
