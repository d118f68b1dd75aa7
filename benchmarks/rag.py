"""Retrieval over a knowledge base: latency of `tunelab.rag.index` over 100,000 chunks on this machine.

Chunks: 100,000 overlapping 160-character windows (stride 38) over the 38,158 built-in tweets joined into one
text — real, distinct text of a support-message length; each window is one chunk (one document). They are encoded
with MiniLM (the index's default encoder, fp32) and indexed as `tunelab index build` indexes them (FAISS exact inner
product, bm25s). Queries: 300 tweets of the built-in set, timed one at a time, after 20 warm-up queries.
Reported, p50 / p99 in milliseconds: encoding the query; dense search; BM25 search; hybrid search alone (both
searches and the fusion, the query vector given); hybrid search including encoding the query. Targets: hybrid
search alone p50 ≤ 20 ms, including encoding ≤ 40 ms.

Writes benchmarks/results/rag.json.

    python benchmarks/rag.py [--chunks 100000] [--queries 300]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

WINDOW, STRIDE = 160, 38


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def timed(fn, items) -> list[float]:
    out = []
    for x in items:
        start = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()

    from tunelab.assets import builtin_path
    from tunelab.rag.index import Encoder, Index, _write
    from tunelab.rag.sources import Document

    with open(builtin_path("builtin:tweets-sentiment"), encoding="utf-8", errors="replace") as f:
        tweets = [" ".join(r["text"].split()) for r in csv.DictReader(f) if r.get("text")]
    corpus = " ".join(tweets)
    windows = [corpus[i:i + WINDOW] for i in range(0, len(corpus) - WINDOW, STRIDE)][:args.chunks]
    queries = tweets[::max(1, len(tweets) // (args.queries + 20))][:args.queries + 20]
    enc = Encoder()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "windows.txt"
        source.write_text("\n".join(windows), encoding="utf-8")
        docs = [Document(f"w{i:06d}", str(source), "text", w) for i, w in enumerate(windows)]
        start = time.perf_counter()
        index, summary = _write(Path(tmp) / "index", enc, {}, docs, [], {"max_chars": 1000, "overlap": 0}, {},
                                overwrite=False, report=None)
        build_s = time.perf_counter() - start
        index = Index.load(Path(tmp) / "index", enc)
        vectors = {q: enc([q])[0] for q in queries}
        n = min(len(index.chunks), 50)
        for q in queries[:20]:  # warm-up
            index.search(q, 10)
        queries = queries[20:]
        times = {
            "encode_query": timed(lambda q: enc([q]), queries),
            "dense_search": timed(lambda q: index.dense.search(vectors[q][None], n), queries),
            "bm25_search": timed(lambda q: index._bm25_search(q, n), queries),
            "hybrid_search_alone": timed(lambda q: index.search(q, 10, vector=vectors[q]), queries),
            "hybrid_with_encoding": timed(lambda q: index.search(q, 10), queries),
        }
    table = {name: {"p50_ms": round(statistics.median(v), 2), "p99_ms": round(pct(v, 99), 2)}
             for name, v in times.items()}
    payload = {"chunks": len(index.chunks), "queries": len(queries), "encoder": enc.ref,
               "build_seconds": round(build_s, 1), "latency": table,
               "targets": {"hybrid_search_alone_p50_le_20ms": table["hybrid_search_alone"]["p50_ms"] <= 20,
                           "hybrid_with_encoding_p50_le_40ms": table["hybrid_with_encoding"]["p50_ms"] <= 40}}
    for name, row in table.items():
        print(f"{name:24s} p50 {row['p50_ms']:7.2f} ms   p99 {row['p99_ms']:7.2f} ms")
    print("wrote", write_result("rag", payload))


if __name__ == "__main__":
    main()
