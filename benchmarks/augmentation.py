"""Does augmentation help? MiniLM fine-tuned on a small train subset of the built-in tweets, with and
without augmenting that subset (EDA swap/delete/synonym + SmolLM2 paraphrase, label-preservation filter),
several seeds each, same validation and test rows. Writes benchmarks/results/augmentation.json.

    python benchmarks/augmentation.py [--train-rows 400] [--seeds 0 1 2] [--ops swap delete synonym paraphrase]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import AugmentConfig, PrepareOptions, validate  # noqa: E402
from tunelab.data.augment import augment  # noqa: E402
from tunelab.data.dataset import SPLITS, load_meta, load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.data.split import sample_rows  # noqa: E402
from tunelab.evaluate.report import evaluate  # noqa: E402
from tunelab.train.loop import train  # noqa: E402


def write_dataset(src_meta: dict, splits: dict[str, list[dict]], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in splits[name]:
                f.write(json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
    meta = dict(src_meta, splits={k: len(v) for k, v in splits.items()},
                fingerprint=f"{out.name}-{sum(len(v) for v in splits.values())}")
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def finetune_f1(data_dir: Path, out: Path, seed: int, epochs: int, max_steps: int | None = None) -> float:
    cfg = validate({"model": {"base": "builtin:minilm-l6"}, "data": {"dir": str(data_dir)},
                    "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": 16, "lr": 5e-5,
                              "eval_every": max_steps or 0, "save_every": 10**9, "seed": seed}})
    summary = train(cfg, out, overwrite=True, show_progress=False)
    return evaluate(summary["model_dir"], data_dir, "test", None, baselines=[])["macro_f1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-rows", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ops", nargs="+", default=["swap", "delete", "synonym", "paraphrase"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-aug-"))
    prepare("builtin:tweets-sentiment", tmp / "full", PrepareOptions())
    meta = load_meta(tmp / "full")
    base = {"train": sample_rows(load_split(tmp / "full", "train"), args.train_rows, "label", 0)[0],
            "validation": load_split(tmp / "full", "validation")[:500],
            "test": load_split(tmp / "full", "test")[:1000]}
    t0 = time.perf_counter()
    new, aug_report = augment(base["train"], AugmentConfig(enabled=True, ops=args.ops), seed=0)
    aug_seconds = time.perf_counter() - t0
    print(f"augmentation: {aug_report} in {aug_seconds:.0f} s", flush=True)
    plain = write_dataset(meta, base, tmp / "plain")
    augmented = write_dataset(meta, dict(base, train=base["train"] + new), tmp / "augmented")
    # The augmented run takes more optimizer steps over the same epochs; "plain_same_steps" trains on the
    # originals only for as many steps, so any gain left is the data's, not the longer training's.
    aug_steps = args.epochs * -(-(len(base["train"]) + len(new)) // 16)
    arms = (("plain", plain, None), ("plain_same_steps", plain, aug_steps), ("augmented", augmented, None))
    scores = {name: [] for name, _, _ in arms}
    for seed in args.seeds:
        for name, d, steps in arms:
            f1 = finetune_f1(d, tmp / f"run-{name}-{seed}", seed, args.epochs, steps)
            scores[name].append(f1)
            print(f"seed {seed} {name}: macro-F1 {f1:.4f}", flush=True)
    summary = {k: {"mean": statistics.mean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "runs": v}
               for k, v in scores.items()}
    gain = summary["augmented"]["mean"] - summary["plain"]["mean"]
    gain_same_steps = summary["augmented"]["mean"] - summary["plain_same_steps"]["mean"]
    for name, v in summary.items():
        print(f"{name}: macro-F1 {v['mean']:.4f} ± {v['stdev']:.4f}")
    print(f"gain over plain {gain:+.4f}, over plain with the same steps {gain_same_steps:+.4f}")
    path = write_result("augmentation", {
        "setup": {"model": "builtin:minilm-l6", "train_rows": args.train_rows, "epochs": args.epochs,
                  "seeds": args.seeds, "validation_rows": 500, "test_rows": 1000, "ops": args.ops},
        "augmentation": aug_report, "augmentation_seconds": aug_seconds, "macro_f1": summary, "gain": gain,
        "gain_over_same_steps": gain_same_steps, "augmented_steps": aug_steps})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
