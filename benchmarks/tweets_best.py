"""`examples/tweets-best.yaml` against the strongest cheap baseline on splits it was not tuned on.

For each split seed (`--seeds`, default 1 2 3; the example was chosen on seed 0, the split `data/tweets` holds):
prepare the built-in tweets with that seed, train the example on it (`tunelab train`, the wall time measured: the
target is <= 30 minutes on these 2 cores), then score the model and the TF-IDF word+char + LR baseline (tuned on the
same validation split, fit on the same train split) on the same test split. The zero-shot baseline is far weaker
on this task (about 0.2 macro-F1 in the README's report) and is not rerun here. Target: the model's macro-F1 beats
the baseline's by >= 0.05 on every seed. Also reported: each difference's paired bootstrap interval (1,000
resamples of the test rows) and the members' validation scores.

Run alone (2 cores): `python benchmarks/tweets_best.py` (~30 min per seed) -> benchmarks/results/tweets_best.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402

from tunelab.config import PrepareOptions  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.evaluate.baselines import tfidf_logreg  # noqa: E402
from tunelab.evaluate.metrics import paired_bootstrap  # noqa: E402
from tunelab.evaluate.report import evaluate  # noqa: E402
from tunelab.predict import predict_texts  # noqa: E402

REPO = Path(__file__).parent.parent
ROOT = REPO / "runs" / "tweets-best-bench"
EXAMPLE = REPO / "examples" / "tweets-best.yaml"
TARGET_GAP = 0.05
BUDGET_S = 30 * 60


def one_seed(seed: int, reuse: bool) -> dict:
    data, run = ROOT / f"data-seed{seed}", ROOT / f"seed{seed}"
    if not (data / "dataset.json").is_file():
        prepare("builtin:tweets-sentiment", data, PrepareOptions(seed=seed))
    seconds = None
    if not (reuse and (run / "model" / "tunelab.json").is_file()):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(EXAMPLE), f"data.dir={data}",
                        f"data.prepare.seed={seed}", "--out", str(run), "--overwrite"], check=True)
        seconds = round(time.perf_counter() - started, 1)
    report = evaluate(run / "model", data, "test", overrides={"baselines": []})
    test, train, validation = (load_split(data, s) for s in ("test", "train", "validation"))
    labels = report["confusion_matrix"]["labels"]
    y = np.array([labels.index(r["label"]) for r in test])
    base = tfidf_logreg(train, test, labels, 0, validation_rows=validation, predictions=True)
    model_pred = np.array([labels.index(r["prediction"]) for r in predict_texts(run / "model",
                                                                                   [r["text"] for r in test])])
    base_pred = np.array(base.pop("predictions"))
    gap = report["macro_f1"] - base["macro_f1"]
    meta = json.loads((run / "model" / "tunelab.json").read_text())
    members = [m.get("validation", {}).get("macro_f1") for m in meta.get("members", [])]
    return {"seed": seed, "train_seconds": seconds, "within_budget": None if seconds is None else seconds <= BUDGET_S,
            "model_macro_f1": report["macro_f1"], "model_accuracy": report["accuracy"],
            "tfidf_macro_f1": base["macro_f1"], "tfidf_accuracy": base["accuracy"], "tfidf": base["name"],
            "gap": gap, "target_met": gap >= TARGET_GAP,
            "paired_bootstrap_macro_f1": paired_bootstrap(y, model_pred, base_pred, "macro_f1"),
            "members_validation_macro_f1": members, "test_rows": len(test), "train_rows": len(train)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--reuse", action="store_true", help="score models already trained in runs/tweets-best-bench")
    args = ap.parse_args()
    earlier = RESULTS / "tweets_best.json"  # seeds measured by an earlier run are kept unless measured again
    kept = {r["seed"]: r for r in (json.loads(earlier.read_text()).get("seeds", []) if earlier.is_file() else [])}
    for seed in args.seeds:
        kept[seed] = one_seed(seed, args.reuse)
        print(json.dumps({k: v for k, v in kept[seed].items() if k != "paired_bootstrap_macro_f1"}), flush=True)
    results = [kept[s] for s in sorted(kept)]
    path = write_result("tweets_best", {
        "example": "examples/tweets-best.yaml", "config": EXAMPLE.read_text(), "target_gap": TARGET_GAP,
        "budget_s": BUDGET_S, "tuned_on": "split seed 0 (data/tweets)", "seeds": results,
        "all_met": all(r["target_met"] for r in results),
        "min_gap": min(r["gap"] for r in results)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
