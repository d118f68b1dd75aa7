"""`tunelab data prepare` on a 1,000,000-row corpus built from the built-in tweets.

The corpus: each base row joins four quarter-fragments of four random tweets (so rows are distinct),
with a label from the first; 3% of base rows get a near-duplicate copy with one small edit (a word
replaced, deleted or inserted, plus case/punctuation noise): the planted ground truth. 1% of rows are
exact copies (case/whitespace changed). Measured, side by side in one run:
- rows/s of the whole prepare (clean + PII + exact + near dedup + split + write),
- a bare Arrow parse of the same CSV (`pyarrow.csv.read_csv`, the floor) and the ratio,
- peak RSS of the prepare (a child process, so the parse and generation do not count),
- near-duplicate precision/recall on the planted pairs at the default threshold.
Writes benchmarks/results/data_prepare.json.

    python benchmarks/data_prepare.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
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
    line_ids = [i for _, _, i, _ in out]  # data row k sits on line k + 2 (line 1 is the header)
    return {"rows": rows, "base": n_base, "planted_near": n_near, "planted_exact": n_exact, "truth": truth,
            "line_ids": line_ids}


def bare_parse_seconds(path: Path) -> float:
    import pyarrow.csv as pacsv

    t0 = time.perf_counter()
    table = pacsv.read_csv(path)
    dt = time.perf_counter() - t0
    assert table.num_rows > 0
    return dt


def run_prepare_child(src: Path, out: Path) -> dict:
    """Run the prepare (default options) in a fresh process; -> its wall time and peak RSS."""
    code = f"""
import json, resource, time
from tunelab.data.prepare import prepare
t0 = time.perf_counter()
meta = prepare({str(src)!r}, {str(out)!r})
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "report": meta["report"]}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def near_dup_scores(out: Path, truth: dict[int, int], line_ids: list[int]) -> dict:
    """Planted pairs (copy, source) vs the near-duplicate groups the prepare found (`near_duplicates.jsonl`)."""
    truth_pairs = {tuple(sorted(p)) for p in truth.items()}
    # copies of the same source are near-duplicates of each other too
    by_src: dict[int, list[int]] = {}
    for c, s in truth.items():
        by_src.setdefault(s, []).append(c)
    for copies in by_src.values():
        truth_pairs |= {tuple(sorted(p)) for p in combinations(copies, 2)}
    found = set()
    with open(out / "near_duplicates.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = sorted(line_ids[n - 2] for n in json.loads(line)["lines"])
            found |= set(combinations(ids, 2))
    tp = len(found & truth_pairs)
    return {"planted_pairs": len(truth_pairs), "found_pairs": len(found), "true_positives": tp,
            "precision": tp / len(found) if found else 1.0, "recall": tp / len(truth_pairs) if truth_pairs else 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-prep-"))
    src = tmp / "corpus.csv"
    t0 = time.perf_counter()
    corpus = build_corpus(src, args.rows)
    print(f"corpus: {args.rows:,} rows, {src.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
          flush=True)
    parse_s = min(bare_parse_seconds(src) for _ in range(3))
    print(f"bare Arrow parse: {parse_s:.2f} s", flush=True)
    res = run_prepare_child(src, tmp / "out")
    print(f"prepare: {res['seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    scores = near_dup_scores(tmp / "out", corpus["truth"], corpus["line_ids"])
    print(f"near-dup precision {scores['precision']:.4f} recall {scores['recall']:.4f}", flush=True)
    payload = {
        "setup": {k: v for k, v in corpus.items() if k not in ("truth", "line_ids")}
        | {"file_mb": src.stat().st_size / 1e6},
        "prepare_seconds": res["seconds"], "rows_per_s": args.rows / res["seconds"],
        "bare_arrow_parse_seconds": parse_s, "ratio_to_bare_parse": res["seconds"] / parse_s,
        "peak_rss_mb": res["peak_rss_mb"], "near_dup": scores, "report": res["report"],
        "targets": {"prepare_seconds": 120, "ratio_to_bare_parse": 10, "peak_rss_mb": 4096,
                    "near_dup_precision": 0.95, "near_dup_recall": 0.95},
    }
    print(f"wrote {write_result('data_prepare', payload)}")


if __name__ == "__main__":
    main()
