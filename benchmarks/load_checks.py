"""What the model-file checks cost at load time (`tunelab.model_files`: safetensors header, every tensor finite,
and the sha256 of each weight file against the size and hash recorded in the model dir's tunelab.json).

For a MiniLM-L6 classifier model dir (full weights, ~87 MB) and a SmolLM2-135M causal-LM model dir (full
weights, ~540 MB), `load_model_dir` is timed with the checks and with them switched off, alternating, five
times each, in one process (the files are in the page cache after the first load in both arms). Writes
benchmarks/results/load_checks.json.

    python benchmarks/load_checks.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import tunelab.model_files as mf  # noqa: E402
from tunelab.models import load_causal_lm, load_classifier, load_model_dir, save_model_dir  # noqa: E402

REPEATS = 5


def model_dirs(root: Path) -> dict[str, Path]:
    meta = {"base": {}, "method": {"name": "full"}, "max_length": 128,
            "data": {"dir": "x", "fingerprint": "f", "train_examples": 0}}
    clf, tok, _, _ = load_classifier("builtin:minilm-l6", ["negative", "neutral", "positive"])
    save_model_dir(clf, tok, root / "minilm", {**meta, "task": "classification", "labels": ["negative", "neutral",
                                                                                          "positive"],
                                               "base": {"ref": "builtin:minilm-l6"}})
    lm, tok, _, _ = load_causal_lm("builtin:smollm2-135m-instruct")
    save_model_dir(lm, tok, root / "smollm2", {**meta, "task": "causal_lm", "labels": [],
                                               "base": {"ref": "builtin:smollm2-135m-instruct"}})
    return {"minilm-l6 classifier": root / "minilm", "smollm2-135m causal_lm": root / "smollm2"}


def timed(d: Path) -> float:
    t = time.perf_counter()
    load_model_dir(d)
    return time.perf_counter() - t


def main() -> None:
    real = mf.check_model_folder, mf.check_tokenizer_folder
    off = (lambda d, files=None: None, lambda d: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="load-checks-") as tmp:
        for name, d in model_dirs(Path(tmp)).items():
            size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
            timed(d)  # warm the page cache
            runs = {"checked": [], "unchecked": []}
            for _ in range(REPEATS):
                for arm, fns in (("checked", real), ("unchecked", off)):
                    mf.check_model_folder, mf.check_tokenizer_folder = fns
                    runs[arm].append(timed(d))
            mf.check_model_folder, mf.check_tokenizer_folder = real
            med = {arm: statistics.median(v) for arm, v in runs.items()}
            rows.append({"model_dir": name, "weights_mb": size / 2**20, "load_s_checked": med["checked"],
                         "load_s_unchecked": med["unchecked"], "ratio": med["checked"] / med["unchecked"],
                         "runs": runs})
            print(f"{name:24s} {size / 2**20:7.1f} MB · load {med['unchecked']:.2f} s unchecked, "
                  f"{med['checked']:.2f} s checked ({med['checked'] / med['unchecked']:.2f}×)", flush=True)
    path = write_result("load_checks", {"repeats": REPEATS, "runs": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
