"""Continual learning on a real domain shift: a MiniLM sentiment classifier trained on general tweets learns airline
customer-service tweets. Which way of updating it learns the new domain without forgetting the old one?

The built-in tweets (a prepared dataset dir, `data/tweets` by default) are split by domain: the "new" domain is every
tweet addressed to a US airline's account (@united, @SouthwestAir, @AmericanAir, @USAirways, @JetBlue,
@VirginAmerica, @Delta); the "old" domain is the rest (politics, sport, brands, technology). Each domain keeps the
split it had in the dataset (nothing of a test split is trained on); train and validation are seeded stratified
samples of fixed sizes, test is the whole domain test split up to `--test` rows.

1. The old model: MiniLM fine-tuned on the old domain (`train`).
2. Arms, each an update of the old model on the new domain (`tunelab update`), or a retrain:
   naive (new data only), replay 10% and 20%, EWC and L2-SP (two strengths each), LoRA (new data only),
   and the full retrain from MiniLM on old + new (the reference: what the old model would be had it seen both).
3. Per arm: old-domain and new-domain macro-F1 after, the change against the old model, compute (training
   examples processed, plus the Fisher rows' forward/backward for EWC), and the target: old-domain drop ≤ 1 point,
   ≥ 90% of the retrain's new-domain gain, ≤ 30% of its compute.

Run alone (2 cores): `python benchmarks/continual.py` (~25 min) -> benchmarks/results/continual.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, peak_rss_mb, write_result  # noqa: E402

from tunelab.config import PrepareOptions, validate  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.data.prepare import prepare  # noqa: E402
from tunelab.data.split import seeded_subset  # noqa: E402
from tunelab.train.loop import train  # noqa: E402
from tunelab.train.update import scores, update  # noqa: E402

AIRLINE = re.compile(r"@(united|southwestair|americanair|usairways|jetblue|virginamerica|delta)\b", re.I)
RESULT = RESULTS / "continual.json"
TARGET = {"max_old_drop": 0.01, "min_gain_share": 0.9, "max_compute_share": 0.3}


def domain_datasets(src: Path, work: Path, sizes: dict, seed: int) -> dict[str, Path]:
    """`old`, `new` and `all` (old + new, for the retrain) dataset dirs under `work`, each with its fixed split."""
    rows = {"old": [], "new": []}
    for split in ("train", "validation", "test"):
        for domain in rows:
            part = [r for r in load_split(src, split) if bool(AIRLINE.search(r["text"])) == (domain == "new")]
            n = sizes[{"train": domain, "validation": "validation", "test": "test"}[split]]
            rows[domain] += [{**r, "split": split} for r in seeded_subset(part, n, seed=seed, stratify="label")]
    rows["all"] = [r for r in rows["old"] + rows["new"] if r["split"] != "test"] + \
        [r for r in rows["old"] if r["split"] == "test"]
    dirs = {}
    for name, part in rows.items():
        source = work / f"{name}.jsonl"
        source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        dirs[name] = work / f"data-{name}"
        prepare(str(source), dirs[name], PrepareOptions(split_column="split", text_column="text",
                                                        label_column="label"), overwrite=True)
    return dirs


def run_config(data_dir: Path, epochs: int, seed: int) -> dict:
    """The shipped MiniLM example's settings (examples/tweets-minilm.yaml) on `data_dir`."""
    return {"task": "classification", "model": {"base": "builtin:minilm-l6", "max_length": 128},
            "data": {"dir": str(data_dir)}, "method": {"name": "full"},
            "train": {"epochs": epochs, "batch_size": 32, "lr": 5.0e-5, "warmup_ratio": 0.06, "eval_every": 0,
                      "early_stopping_patience": 2, "seed": seed}}


def arm_settings(name: str, lora_lr: float) -> dict:
    """An arm's name -> `update` keywords. Parts joined by "+": naive (the new data alone), replayNN or replay:S
    (a share of old rows), ewc:λ / l2sp:λ (a pull), lora (LoRA at `lora_lr`), epochs:N."""
    how: dict = {"overrides": []}
    for part in name.split("+"):
        key, _, value = part.partition(":")
        if key == "naive":
            continue
        if key.startswith("replay"):
            how["replay"] = float(value) if value else int(key[len("replay"):]) / 100
        elif key in ("ewc", "l2sp"):
            how["regularize"], how["strength"] = key, float(value)
        elif key == "lora":
            how["method"] = "lora"
            how["overrides"].append(f"train.lr={lora_lr}")
        elif key == "epochs":
            how["overrides"].append(f"train.epochs={int(value)}")
        else:
            raise SystemExit(f"unknown arm part {part!r} in {name!r}")
    return how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/tweets", help="the prepared built-in tweets dataset dir")
    ap.add_argument("--work", default="/tmp/tunelab-continual")
    ap.add_argument("--old", type=int, default=4000, help="old-domain train rows")
    ap.add_argument("--new", type=int, default=1000, help="new-domain train rows")
    ap.add_argument("--validation", type=int, default=500, help="validation rows per domain")
    ap.add_argument("--test", type=int, default=1500, help="test rows per domain (at most)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="naive,replay10,replay20,ewc:1,ewc:10,l2sp:1,l2sp:10,lora,retrain,"
                    "replay20+l2sp:1,replay50+epochs:1", help="comma-separated (see arm_settings)")
    ap.add_argument("--reuse", action="store_true", help="keep --work's datasets and old model and the results "
                    "JSON's arms (same sizes and seed); run only the arms not in it")
    args = ap.parse_args()
    work, t0 = Path(args.work), time.perf_counter()
    sizes = {"old": args.old, "new": args.new, "validation": args.validation, "test": args.test}
    earlier = json.loads(RESULT.read_text()) if args.reuse and RESULT.is_file() else {}
    if earlier and (earlier.get("requested_sizes"), earlier.get("epochs"), earlier.get("seed")) != (
            sizes, args.epochs, args.seed):
        raise SystemExit(f"--reuse: {RESULT} was measured with other sizes, epochs or seed")
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    dirs = {name: work / f"data-{name}" for name in ("old", "new", "all")}
    if not (args.reuse and all((d / "dataset.json").is_file() for d in dirs.values())):
        dirs = domain_datasets(Path(args.data), work, sizes, args.seed)
    stated = {name: json.loads((d / "dataset.json").read_text())["splits"] for name, d in dirs.items()}
    print("datasets:", stated, flush=True)

    old_model = work / "old" / "model"
    if args.reuse and earlier and old_model.is_dir():
        old = earlier["old_model"]
    else:
        old_run = train(validate(run_config(dirs["old"], args.epochs, args.seed)), work / "old",
                        show_progress=False, overwrite=True)
        old = {"old": scores(old_model, dirs["old"]), "new": scores(old_model, dirs["new"]),
               "examples_seen": old_run["examples_seen"], "train_s": round(time.perf_counter() - t0, 1)}
    print("old model:", old, flush=True)

    arms = dict(earlier.get("arms", {})) if args.reuse else {}
    for name in args.arms.split(","):
        t, out = time.perf_counter(), work / name.replace(":", "-").replace("+", "_")
        if name in arms:
            continue
        if name == "retrain":
            run = train(validate(run_config(dirs["all"], args.epochs, args.seed)), out, show_progress=False,
                        overwrite=True)
            model = Path(run["model_dir"])
            after = {"old": scores(model, dirs["old"]), "new": scores(model, dirs["new"])}
            examples, settings = run["examples_seen"], {"from": "builtin:minilm-l6", "data": "old + new"}
        else:
            how = arm_settings(name, args.lora_lr)
            rec = update(old_model, dirs["new"], out, **how, min_gain=0.01, max_drop=0.01, overwrite=True)
            after, settings = rec["after"], {**how, "gate": rec["gate"]}
            examples = rec["training"]["examples_seen"]
            if how.get("regularize") == "ewc":  # the Fisher pass: a forward and backward per old row
                examples += json.loads((out / "model" / "tunelab.json").read_text())["regularize"]["fisher_rows"]
        arms[name] = {"settings": settings, "old_macro_f1": after["old"]["macro_f1"],
                      "new_macro_f1": after["new"]["macro_f1"],
                      "old_change": after["old"]["macro_f1"] - old["old"]["macro_f1"],
                      "new_change": after["new"]["macro_f1"] - old["new"]["macro_f1"],
                      "examples": examples, "wall_s": round(time.perf_counter() - t, 1)}
        print(name, {k: v for k, v in arms[name].items() if k != "settings"}, flush=True)

    if "retrain" in arms:
        ref = arms["retrain"]
        for a in arms.values():
            a["gain_share"] = a["new_change"] / ref["new_change"] if ref["new_change"] > 0 else None
            a["compute_share"] = a["examples"] / ref["examples"]
            a["meets_target"] = bool(-a["old_change"] <= TARGET["max_old_drop"] and a["gain_share"] is not None
                                     and a["gain_share"] >= TARGET["min_gain_share"]
                                     and a["compute_share"] <= TARGET["max_compute_share"])
    print(f"{'arm':<10} {'old F1':>7} {'Δold':>7} {'new F1':>7} {'Δnew':>7} {'gain%':>6} {'compute%':>8} target")
    print(f"{'(before)':<10} {old['old']['macro_f1']:>7.4f} {'':>7} {old['new']['macro_f1']:>7.4f}")
    for name, a in arms.items():
        share = f"{a['gain_share']:.0%}" if a.get("gain_share") is not None else "-"
        print(f"{name:<10} {a['old_macro_f1']:>7.4f} {a['old_change']:>+7.4f} {a['new_macro_f1']:>7.4f} "
              f"{a['new_change']:>+7.4f} {share:>6} {a.get('compute_share', 0):>8.0%} "
              f"{'yes' if a.get('meets_target') else 'no'}")
    path = write_result("continual", {
        "domains": {"new": "tweets addressed to a US airline's account (" + AIRLINE.pattern + ")",
                    "old": "the other tweets"},
        "requested_sizes": sizes, "sizes": stated, "epochs": args.epochs, "seed": args.seed, "target": TARGET,
        "old_model": old,
        "arms": arms, "winners": [n for n, a in arms.items() if a.get("meets_target")],
        "peak_rss_mb": round(peak_rss_mb()), "last_run_s": round(time.perf_counter() - t0, 1)})
    print("wrote", path)


if __name__ == "__main__":
    main()
