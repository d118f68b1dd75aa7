"""The streaming MinHash anchor of `benchmarks/data_prepare.py`: datatrove's four-stage MinHash de-duplication
(signatures -> buckets -> clusters -> filter) over JSONL shards, with its local executor.

Run in the anchor's own venv (`bash benchmarks/dedup_anchor_env.sh` creates it and prints its python):
`ANCHOR_PY benchmarks/dedup_anchor.py SHARDS_DIR WORK_DIR OUT.json [--workers 2]`. SHARDS_DIR holds `*.jsonl` rows
`{"id", "text"}` (one task per shard). Configured as tunelab's near-duplicate stage is: word bigrams, 64 hash
functions in 16 buckets of 4 (datatrove's defaults are 5-grams and 14 x 8); its own text normalisation (lower case,
punctuation removed). Writes the wall time of the four stages, peak RSS, and the clusters (lists of ids).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer

WORD = re.compile(r"\w+")


class Words(WordTokenizer):
    """`\\w+` words (datatrove's default English tokenizer needs NLTK data, which cannot be downloaded offline)."""

    def word_tokenize(self, text: str) -> list[str]:
        return WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in WORD.finditer(text)]


def run(shards: Path, work: Path, workers: int) -> float:
    tasks = len(list(shards.glob("*.jsonl")))
    cfg = MinhashConfig(n_grams=2, num_buckets=16, hashes_per_bucket=4)
    sigs, buckets, remove, out = (work / n for n in ("sigs", "buckets", "remove", "out"))
    common = {"logging_dir": str(work / "logs"), "skip_completed": False}
    stages = [
        LocalPipelineExecutor(pipeline=[JsonlReader(str(shards)),
                                        MinhashDedupSignature(str(sigs), config=cfg, language=Words())],
                              tasks=tasks, workers=workers, **common),
        LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(str(sigs), str(buckets), config=cfg)],
                              tasks=cfg.num_buckets, workers=workers, **common),
        LocalPipelineExecutor(pipeline=[MinhashDedupCluster(str(buckets), str(remove), config=cfg,
                                                            save_cluster_id=True)], tasks=1, **common),
        LocalPipelineExecutor(pipeline=[JsonlReader(str(shards)),
                                        MinhashDedupFilter(str(remove), load_cluster_ids=True,
                                                           exclusion_writer=JsonlWriter(str(out / "removed"))),
                                        JsonlWriter(str(out / "kept"))], tasks=tasks, workers=workers, **common),
    ]
    t0 = time.perf_counter()
    for stage in stages:
        stage.run()
    return time.perf_counter() - t0


def clusters(out: Path) -> list[list[str]]:
    import gzip

    members: dict[int, list[str]] = {}  # cluster ids are global: one clustering task sees every shard
    for f in sorted(out.rglob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                doc = json.loads(line)
                cid = doc.get("metadata", {}).get("minhash_cluster_id", -1)
                if cid != -1:
                    members.setdefault(cid, []).append(doc["id"])
    return [m for m in members.values() if len(m) > 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    seconds = run(args.shards, args.work, args.workers)
    found = clusters(args.work / "out")
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    args.out.write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 1024, "clusters": found}))


if __name__ == "__main__":
    main()
