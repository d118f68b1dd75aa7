"""The overfitting remedies on the built-in tweets: plain fine-tuning vs FGM vs PGD vs a 3-model ensemble.

Setup (time budget ~40 min on 2 cores, run alone): MiniLM-L6, full fine-tune, bf16 where the CPU has it, on
`--train` rows (a seeded stratified subset) of the tweets' train split (the dataset prepared with seed
`--split-seed`), `--epochs` epochs, the best step picked on the validation split, scored on the whole test split.

Arms (same data, same schedule; only the remedy differs):
- plain: the config as shipped (seed 0);
- fgm: `train.adversarial: {method: fgm, epsilon: --epsilon}`;
- pgd: `train.adversarial: {method: pgd, epsilon: --epsilon, alpha: epsilon/3, steps: 3}`;
- ensemble: the mean of the probabilities of three plain models of seeds 0, 1, 2 (the plain arm is its first);
- and, for reference, the TF-IDF word+char + LR baseline on the full train split.

Each is scored on the test split and on a perturbed copy of it (seeded): in 15% of the words of each text one of
a typo (a letter dropped, doubled or replaced by a keyboard neighbour), a swap of two adjacent letters, or a casing
change (upper, lower or capitalised). Reported: macro-F1 and accuracy on both, each with a 95% bootstrap interval
(1,000 resamples of the test rows), and each remedy's paired bootstrap difference from plain (the same resampled
rows for both), so "helps" means the interval of the difference excludes zero. Also each arm's training seconds
(validation passes excluded; an ensemble's are its three members').

`python benchmarks/robustness.py` -> benchmarks/results/robustness.json (`--reuse` keeps trained arms).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import string
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.config import PrepareOptions, validate  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.ensemble import build_ensemble  # noqa: E402
from tunelab.evaluate.baselines import tfidf_logreg  # noqa: E402
from tunelab.evaluate.metrics import bootstrap_interval, classification_metrics, paired_bootstrap  # noqa: E402
from tunelab.predict import predict_texts  # noqa: E402
from tunelab.train.loop import train  # noqa: E402

ROOT = Path(__file__).parent.parent / "runs" / "robustness-bench"
KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def neighbours(c: str) -> str:
    """The letters beside `c` on a QWERTY keyboard (same case)."""
    low = c.lower()
    for row in KEYBOARD:
        i = row.find(low)
        if i >= 0:
            near = row[max(0, i - 1):i] + row[i + 1:i + 2]
            return near.upper() if c.isupper() else near
    return ""


def perturb_word(w: str, rng: random.Random) -> str:
    """One seeded edit of a word: a typo, an adjacent swap or a casing change."""
    letters = [i for i, c in enumerate(w) if c.isalpha()]
    op = rng.choice(["drop", "double", "neighbour", "swap", "case"])
    if op == "case" or not letters:
        return rng.choice([w.upper(), w.lower(), w.capitalize()]) if w.upper() != w.lower() else w
    i = rng.choice(letters)
    if op == "drop" and len(w) > 1:
        return w[:i] + w[i + 1:]
    if op == "double":
        return w[:i] + w[i] + w[i:]
    if op == "neighbour" and neighbours(w[i]):
        return w[:i] + rng.choice(neighbours(w[i])) + w[i + 1:]
    if op == "swap" and i + 1 < len(w) and w[i + 1].isalpha():
        return w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return w[:i] + rng.choice(string.ascii_lowercase) + w[i + 1:]


def perturb(text: str, share: float, rng: random.Random) -> str:
    """`text` with about `share` of its words edited (at least one)."""
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if w]
    for i in rng.sample(idx, max(1, round(share * len(idx)))) if idx else []:
        words[i] = perturb_word(words[i], rng)
    return " ".join(words)


def train_seconds(run: Path) -> float:
    """The training seconds of a finished run (its last metrics record), validation passes excluded."""
    done = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"done"' in line]
    return round(done[-1]["elapsed_s"] - done[-1].get("eval_s", 0.0), 1)


def config(data: Path, args, seed: int, adversarial: dict | None) -> dict:
    return {"task": "classification", "name": "robustness", "model": {"base": "builtin:minilm-l6", "max_length": 128},
            "data": {"dir": str(data), "max_train_examples": args.train},
            "method": {"name": "full"},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": args.lr, "warmup_ratio": 0.06, "eval_every": 0,
                      "evals_per_epoch": 2, "seed": seed, "adversarial": adversarial, "log_every": 50},
            "eval": {"baselines": []}}


def scores(y: np.ndarray, probs: np.ndarray, labels: list[str], seed: int) -> dict:
    pred = probs.argmax(1)
    m = classification_metrics(y, pred, labels, probs)
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
            "macro_f1_ci": bootstrap_interval(y, pred, "macro_f1", seed=seed),
            "accuracy_ci": bootstrap_interval(y, pred, "accuracy", seed=seed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.15, help="share of words edited in the perturbed copy")
    ap.add_argument("--reuse", action="store_true", help="keep arms already trained in runs/robustness-bench")
    args = ap.parse_args()
    if not args.reuse:
        shutil.rmtree(ROOT, ignore_errors=True)
    data = ROOT / f"tweets-seed{args.split_seed}"
    if not (data / "dataset.json").is_file():
        prepare("builtin:tweets-sentiment", data, PrepareOptions(seed=args.split_seed))
    eps = args.epsilon
    arms = {"plain": (0, None), "fgm": (0, {"method": "fgm", "epsilon": eps}),
            "pgd": (0, {"method": "pgd", "epsilon": eps, "alpha": eps / 3, "steps": 3}),
            "plain_seed1": (1, None), "plain_seed2": (2, None)}
    seconds = {}
    for name, (seed, adv) in arms.items():
        run = ROOT / name
        if not (run / "model" / "tunelab.json").is_file():
            train(validate(config(data, args, seed, adv)), run, overwrite=True, show_progress=False)
        seconds[name] = train_seconds(run)
    ens = ROOT / "ensemble"
    if not (ens / "tunelab.json").is_file():
        build_ensemble([ROOT / n / "model" for n in ("plain", "plain_seed1", "plain_seed2")], ens, overwrite=True)
    test = load_split(data, "test")
    labels = sorted({r["label"] for r in test})
    y = np.array([labels.index(r["label"]) for r in test])
    rng = random.Random(0)
    noisy = [perturb(r["text"], args.noise, rng) for r in test]
    models = {"plain": ROOT / "plain" / "model", "fgm": ROOT / "fgm" / "model", "pgd": ROOT / "pgd" / "model",
              "ensemble": ens}
    out: dict = {}
    preds: dict = {}
    for name, d in models.items():
        clean = predict_texts(d, [r["text"] for r in test])
        dirty = predict_texts(d, noisy)
        pc = np.array([[r["probs"][lab] for lab in labels] for r in clean])
        pn = np.array([[r["probs"][lab] for lab in labels] for r in dirty])
        preds[name] = (pc.argmax(1), pn.argmax(1))
        out[name] = {"test": scores(y, pc, labels, 0), "perturbed": scores(y, pn, labels, 0),
                     "train_seconds": seconds.get(name)}
        print(name, {k: round(v["macro_f1"], 4) for k, v in out[name].items() if isinstance(v, dict)}, flush=True)
    out["ensemble"]["train_seconds"] = round(sum(seconds[n] for n in ("plain", "plain_seed1", "plain_seed2")), 1)
    for name in ("fgm", "pgd", "ensemble"):
        for split, k in (("test", 0), ("perturbed", 1)):
            for metric in ("macro_f1", "accuracy"):
                out[name][split][f"{metric}_vs_plain"] = paired_bootstrap(y, preds[name][k], preds["plain"][k], metric,
                                                                          seed=0)
    full_train = load_split(data, "train")
    validation = load_split(data, "validation")
    base = tfidf_logreg(full_train, test, labels, 0, validation_rows=validation)
    base_noisy = tfidf_logreg(full_train, [{**r, "text": t} for r, t in zip(test, noisy)], labels, 0,
                              validation_rows=validation)
    out["tfidf_full_train"] = {"test": {"macro_f1": base["macro_f1"], "accuracy": base["accuracy"]},
                               "perturbed": {"macro_f1": base_noisy["macro_f1"], "accuracy": base_noisy["accuracy"]},
                               "train_examples": base["train_examples"], "name": base["name"]}
    examples = [{"clean": r["text"], "perturbed": t} for r, t in list(zip(test, noisy))[:3]]
    path = write_result("robustness", {
        "setup": {"model": "builtin:minilm-l6 (full)", "train_rows": args.train, "epochs": args.epochs, "lr": args.lr,
                  "epsilon": eps, "pgd": {"alpha": eps / 3, "steps": 3}, "split_seed": args.split_seed,
                  "test_rows": len(test), "noise_share": args.noise, "bootstrap": 1000,
                  "ensemble": "mean of plain seeds 0, 1, 2"},
        "arms": out, "perturbed_examples": examples})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
