"""`tunelab data prepare` on a 1,000,000-row corpus built from the built-in tweets, and on 10,000,000 rows.

The corpus: each base row joins four quarter-fragments of four random tweets (so rows are distinct),
with a label from the first; 3% of base rows get a near-duplicate copy with one small edit (a word
replaced, deleted or inserted, plus case/punctuation noise): the planted ground truth. 1% of rows are
exact copies (case/whitespace changed). Measured, side by side in one run, each prepare in its own process:
- the in-memory pipeline, and the streaming one with 1 worker (in-process) and 2 worker processes: wall time, rows/s,
  peak RSS (the parent's and the largest worker's), and the three dataset dirs compared file by file (they must be
  the same); the 2-worker / 1-worker speed-up (target >= 1.7x on a 2-core machine),
- a bare Arrow parse of the same CSV (`pyarrow.csv.read_csv`, the floor) and the ratio,
- near-duplicate precision/recall on the planted pairs at the default threshold,
- the streaming MinHash anchor, datatrove (`benchmarks/dedup_anchor.py`, in its own venv from
  `benchmarks/dedup_anchor_env.sh`), on the same rows with 2 workers: its wall time (MinHash de-duplication only,
  no cleaning, PII or split) and precision/recall on the same planted pairs,
- 10,000,000 rows through the streaming pipeline with 2 workers: wall time and peak RSS (target <= 4 GB, the parent
  plus its workers).
Writes benchmarks/results/data_prepare.json.

    python benchmarks/data_prepare.py [--rows 1000000] [--big-rows 10000000] [--no-anchor]
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import PrepareOptions  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402


def load_tweets() -> list[tuple[str, str]]:
    tmp = Path(tempfile.mkdtemp())
    prepare("builtin:tweets-sentiment", tmp / "t", PrepareOptions())
    return [(r["text"], r["label"]) for s in ("train", "validation", "test") for r in load_split(tmp / "t", s)]


def edit(text: str, rng: random.Random, vocab: list[str]) -> str:
    words = text.split()
    op = rng.choice(["replace", "delete", "insert"])
    i = rng.randrange(len(words))
    if op == "replace":
        words[i] = rng.choice(vocab)
    elif op == "delete" and len(words) > 8:
        del words[i]
    else:
        words.insert(i, rng.choice(vocab))
    out = " ".join(words)
    if rng.random() < 0.5:
        out = out.upper() if rng.random() < 0.2 else out.capitalize()
    if rng.random() < 0.5:
        out += rng.choice(["!", "!!", " :)", "...", "?"])
    return out


def build_corpus(path: Path, rows: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    tweets = load_tweets()
    split = [t.split() for t, _ in tweets]
    vocab = sorted({w for ws in split for w in ws if re.fullmatch(r"[a-z]{3,10}", w)})

    def fragment(ws: list[str], q: int) -> list[str]:
        n = len(ws)
        return ws[q * n // 4:(q + 1) * n // 4]

    n_near = int(rows * 0.03)
    n_exact = int(rows * 0.01)
    n_base = rows - n_near - n_exact
    base = []
    for _ in range(n_base):
        picks = [rng.randrange(len(tweets)) for _ in range(4)]
        words = [w for q, p in enumerate(picks) for w in fragment(split[p], q)]
        base.append((" ".join(words) or "empty", tweets[picks[0]][1]))
    out = [(t, y, i, None) for i, (t, y) in enumerate(base)]  # (text, label, id, copy-of)
    for k in range(n_near):
        src = rng.randrange(n_base)
        out.append((edit(base[src][0], rng, vocab), base[src][1], n_base + k, src))
    for k in range(n_exact):
        src = rng.randrange(n_base)
        out.append(("  " + base[src][0].upper() + " ", base[src][1], n_base + n_near + k, -1))
    rng.shuffle(out)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for text, label, i, _ in out:
            w.writerow([i, text, label])
    truth = {i: src for _, _, i, src in out if src is not None and src >= 0}
    truth_all = {i: src for _, _, i, src in out if src is not None}
    line_ids = [i for _, _, i, _ in out]  # data row k sits on line k + 2 (line 1 is the header)
    return {"rows": rows, "base": n_base, "planted_near": n_near, "planted_exact": n_exact, "truth": truth,
            "truth_all": truth_all, "line_ids": line_ids}


def bare_parse_seconds(path: Path) -> float:
    import pyarrow.csv as pacsv

    t0 = time.perf_counter()
    table = pacsv.read_csv(path)
    dt = time.perf_counter() - t0
    assert table.num_rows > 0
    return dt


def run_prepare_child(src: Path, out: Path, streaming: bool, workers: int = 1) -> dict:
    """Run the prepare (default options) in a fresh process; -> its wall time, peak RSS (its own and its largest
    worker's) and report."""
    code = f"""
import json, resource, time
from tunelab.data.prepare import prepare
t0 = time.perf_counter()
meta = prepare({str(src)!r}, {str(out)!r}, streaming={streaming!r}, workers={workers!r})
dt = time.perf_counter() - t0
peak = [resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print(json.dumps({{"seconds": dt, "peak_rss_mb": peak[0], "worker_peak_rss_mb": peak[1], "report": meta["report"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"prepare failed: {proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # workers are forked: each worker's RSS counts the pages it shares with the parent too, so this over-counts
    res["total_peak_rss_mb"] = res["peak_rss_mb"] + (workers * res["worker_peak_rss_mb"] if workers > 1 else 0)
    return res


def same_dirs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def run_anchor(src: Path, tmp: Path, corpus: dict) -> dict:
    """datatrove's MinHash de-duplication on the same rows (two shards, two workers) -> its time and scores."""
    env = subprocess.run(["bash", str(Path(__file__).parent / "dedup_anchor_env.sh")], capture_output=True, text=True)
    if env.returncode:
        return {"available": False, "error": env.stderr[-2000:]}
    python = env.stdout.strip().splitlines()[-1]
    shards = tmp / "shards"
    shards.mkdir()
    with open(src, newline="", encoding="utf-8") as f:
        files = [open(shards / f"part{k}.jsonl", "w", encoding="utf-8") for k in range(2)]
        for n, row in enumerate(csv.DictReader(f)):
            files[n % 2].write(json.dumps({"id": row["id"], "text": row["text"]}, ensure_ascii=False) + "\n")
        for fh in files:
            fh.close()
    out = tmp / "anchor.json"
    proc = subprocess.run([python, str(Path(__file__).parent / "dedup_anchor.py"), str(shards), str(tmp / "work"),
                           str(out), "--workers", "2"], capture_output=True, text=True)
    if proc.returncode:
        return {"available": False, "error": proc.stderr[-2000:]}
    res = json.loads(out.read_text())
    exact_copies = {i for i, src_id in corpus["truth_all"].items() if src_id < 0}
    # exact copies are tunelab's exact stage's to find, not its near one's: left out of the anchor's groups
    clusters = [[int(i) for i in ids if int(i) not in exact_copies] for ids in res.pop("clusters")]
    return {"available": True, "tool": "datatrove 0.10.1", "config": "word 2-grams, 16 buckets x 4 hashes, 2 workers",
            "verification": "none (every LSH collision is a duplicate)", "seconds": res["seconds"],
            "peak_rss_mb": res["peak_rss_mb"], "near_dup": cluster_scores(clusters, corpus["truth"])}


def near_dup_scores(out: Path, truth: dict[int, int], line_ids: list[int]) -> dict:
    """Planted pairs (copy, source) vs the near-duplicate groups the prepare found (`near_duplicates.jsonl`)."""
    with open(out / "near_duplicates.jsonl", encoding="utf-8") as f:
        clusters = [[line_ids[n - 2] for n in json.loads(line)["lines"]] for line in f]
    return cluster_scores(clusters, truth)


def cluster_scores(clusters: list[list[int]], truth: dict[int, int]) -> dict:
    """Found groups of row ids vs the planted pairs (copy, source), copies of one source counting as pairs too:
    pair precision and recall, counted without listing a group's pairs (a chained group can hold 10^4 rows)."""
    truth_pairs = {tuple(sorted(p)) for p in truth.items()}
    # copies of the same source are near-duplicates of each other too
    by_src: dict[int, list[int]] = {}
    for c, s in truth.items():
        by_src.setdefault(s, []).append(c)
    for copies in by_src.values():
        truth_pairs |= {tuple(sorted(p)) for p in combinations(copies, 2)}
    group_of = {i: g for g, ids in enumerate(clusters) for i in ids}
    found = sum(len(ids) * (len(ids) - 1) // 2 for ids in clusters)
    tp = sum(1 for a, b in truth_pairs if a in group_of and group_of[a] == group_of.get(b))
    return {"planted_pairs": len(truth_pairs), "found_pairs": found, "true_positives": tp,
            "largest_group": max(map(len, clusters), default=0),
            "precision": tp / found if found else 1.0, "recall": tp / len(truth_pairs) if truth_pairs else 1.0}


def measure_1m(args, tmp: Path) -> dict:
    src = tmp / "corpus.csv"
    t0 = time.perf_counter()
    corpus = build_corpus(src, args.rows)
    print(f"corpus: {args.rows:,} rows, {src.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    parse_s = min(bare_parse_seconds(src) for _ in range(3))
    print(f"bare Arrow parse: {parse_s:.2f} s", flush=True)
    arms = {}
    for name, streaming, workers in (("in_memory", False, 1), ("streaming_1_worker", True, 1),
                                     ("streaming_2_workers", True, 2)):
        arms[name] = run_prepare_child(src, tmp / name, streaming, workers)
        arms[name]["rows_per_s"] = args.rows / arms[name]["seconds"]
        print(f"{name}: {arms[name]['seconds']:.1f} s, peak RSS {arms[name]['peak_rss_mb']:.0f} MB "
              f"(workers {arms[name]['worker_peak_rss_mb']:.0f} MB)", flush=True)
    same = {name: same_dirs(tmp / "in_memory", tmp / name) for name in arms if name != "in_memory"}
    scores = near_dup_scores(tmp / "streaming_2_workers", corpus["truth"], corpus["line_ids"])
    print(f"same output as in-memory: {same}; near-dup precision {scores['precision']:.4f} "
          f"recall {scores['recall']:.4f}", flush=True)
    anchor = {"available": False, "error": "--no-anchor"} if args.no_anchor else run_anchor(src, tmp, corpus)
    print(f"anchor: {json.dumps(anchor)}", flush=True)
    two, one = arms["streaming_2_workers"], arms["streaming_1_worker"]
    return {"setup": {k: v for k, v in corpus.items() if k not in ("truth", "truth_all", "line_ids")}
            | {"file_mb": src.stat().st_size / 1e6},
            "arms": {k: {x: y for x, y in v.items() if x != "report"} for k, v in arms.items()},
            "same_output_as_in_memory": same, "speedup_2_workers_vs_1": one["seconds"] / two["seconds"],
            "speedup_2_workers_vs_in_memory": arms["in_memory"]["seconds"] / two["seconds"],
            "bare_arrow_parse_seconds": parse_s, "ratio_to_bare_parse": two["seconds"] / parse_s,
            "near_dup": scores, "report": two["report"], "anchor": anchor,
            "tunelab_vs_anchor_seconds": two["seconds"] / anchor["seconds"] if anchor.get("available") else None}


def measure_big(args, tmp: Path) -> dict:
    src = tmp / "big.csv"
    t0 = time.perf_counter()
    corpus = build_corpus(src, args.big_rows, seed=1)
    print(f"big corpus: {args.big_rows:,} rows, {src.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    res = run_prepare_child(src, tmp / "big", True, 2)
    print(f"10M streaming, 2 workers: {res['seconds']:.0f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
          f"workers {res['worker_peak_rss_mb']:.0f} MB", flush=True)
    scores = near_dup_scores(tmp / "big", corpus["truth"], corpus["line_ids"])
    del corpus
    return {"rows": args.big_rows, "file_gb": src.stat().st_size / 1e9, "seconds": res["seconds"],
            "rows_per_s": args.big_rows / res["seconds"], "peak_rss_mb": res["peak_rss_mb"],
            "worker_peak_rss_mb": res["worker_peak_rss_mb"], "total_peak_rss_mb": res["total_peak_rss_mb"],
            "near_dup": scores, "report": res["report"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--big-rows", type=int, default=10_000_000, help="0: skip the large run")
    ap.add_argument("--no-anchor", action="store_true", help="skip datatrove")
    ap.add_argument("--only-big", action="store_true", help="run the large run only; the rest is kept from the "
                    "previous results file")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-prep-"))
    try:
        previous = Path(__file__).parent / "results" / "data_prepare.json"
        payload = json.loads(previous.read_text()) if args.only_big else measure_1m(args, tmp)
        for key in ("benchmark", "machine", "targets"):
            payload.pop(key, None)
        shutil.rmtree(tmp / "shards", ignore_errors=True)
        shutil.rmtree(tmp / "work", ignore_errors=True)
        payload["big"] = measure_big(args, tmp) if args.big_rows else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload["targets"] = {"speedup_2_workers_vs_1": 1.7, "big_total_peak_rss_mb": 4096, "near_dup_precision": 0.95,
                          "near_dup_recall": 0.95}
    print(f"wrote {write_result('data_prepare', payload)}")


if __name__ == "__main__":
    main()
