"""What each compression of the quickstart classifier (MiniLM-L6 fine-tuned on the built-in tweets) costs and
buys, all on its whole test split, the same threads and the same texts:

- PyTorch fp32 eager (the anchor), PyTorch int8 (`tunelab compress --int8`: torch.ao dynamic quantisation, saved
  and reloaded from its model dir), and, when the `torchao` package is importable, torchao's int8 dynamic
  activation + int8 weight on the same model (the successor API, measured to choose between them);
- a pruned student (`tunelab compress --prune-ffn 0.5 --layers 3 --epochs 2`: recovery distilled from the
  teacher), fp32 and int8;
- ONNX Runtime fp32 and int8 (`tunelab export --format onnx`).

For each: weight size, latency p50 at batch 1, throughput at batch 32, macro-F1 and its change against fp32.
Targets: ONNX int8 ≥ 2.5× faster than PyTorch fp32 at batch 1 with ≤ 1.0 point of macro-F1 lost; the pruned
student ≥ 2× faster than its teacher in the same runtime and precision with ≤ 1.5 points lost.

Writes benchmarks/results/compression.json. Needs the model `make demo` trains (`runs/quickstart/model`).

    python benchmarks/compression.py [--model runs/quickstart/model] [--rows 0 (= the whole test split)]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.export import export_model  # noqa: E402
from tunelab.export.parity import batched_outputs, logits_of, texts_of, torch_runner  # noqa: E402
from tunelab.export.prune import compress_prune  # noqa: E402
from tunelab.export.quantize import compress_int8  # noqa: E402
from tunelab.export.onnx import ort_runner, session  # noqa: E402
from tunelab.export.parity import speed  # noqa: E402
from tunelab.models import load_model_dir, max_length_of, read_meta  # noqa: E402


def measure(run, tok, texts: list[str], gold: list[int], max_length: int) -> dict:
    """`parity.speed` (p50 at batch 1, texts/s at batch 32), and macro-F1 over every text."""
    pred = [int(o.argmax()) for o in batched_outputs(run, tok, texts, max_length, batch_size=32)]
    return {**speed(run, tok, texts, max_length),
            "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0))}


def size_mb(d: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in d.glob(pattern)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/quickstart/model")
    ap.add_argument("--rows", type=int, default=0, help="test rows (0: the whole test split)")
    ap.add_argument("--prune-ffn", type=float, default=0.5, help="share of FFN neurons the pruned model keeps")
    ap.add_argument("--layers", type=int, default=3, help="layers the pruned model keeps")
    ap.add_argument("--epochs", type=float, default=2.0, help="epochs of the pruned model's recovery fine-tune")
    ap.add_argument("--torchao-rows", type=int, default=200, help="test rows torchao's (slow) arm scores")
    args = ap.parse_args()
    src = Path(args.model)
    meta = read_meta(src)
    rows = load_split(meta["data"]["path"], "test")
    rows = rows[:args.rows] if args.rows else rows
    texts, gold = texts_of(rows), [meta["labels"].index(r["label"]) for r in rows]
    max_length = max_length_of(meta)
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fp32, tok, _ = load_model_dir(src)
        compress_int8(src, tmp / "int8")
        int8, _, _ = load_model_dir(tmp / "int8")
        start = time.perf_counter()
        compress_prune(src, tmp / "pruned", ffn_keep=args.prune_ffn, layers=args.layers, epochs=args.epochs,
                       show_progress=False)
        prune_s = time.perf_counter() - start
        pruned, _, _ = load_model_dir(tmp / "pruned")
        compress_int8(tmp / "pruned", tmp / "pruned_int8")
        pruned_int8, _, _ = load_model_dir(tmp / "pruned_int8")
        candidates = {"pytorch_fp32": (fp32, size_mb(src, "*.safetensors")),
                      "pytorch_int8": (int8, size_mb(tmp / "int8", "*.safetensors")),
                      "pruned_fp32": (pruned, size_mb(tmp / "pruned", "*.safetensors")),
                      "pruned_int8": (pruned_int8, size_mb(tmp / "pruned_int8", "*.safetensors"))}
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            ao = copy.deepcopy(fp32)
            quantize_(ao, Int8DynamicActivationInt8WeightConfig())
            candidates["torchao_int8"] = (ao, None)
        except ImportError as err:
            arms["torchao_int8"] = {"skipped": f"torchao not importable: {err}"}
        for name, (model, size) in candidates.items():
            # torchao's CPU path is a slow reference one: its speeds are measured, its F1 on a sample only
            n = args.torchao_rows if name == "torchao_int8" else len(texts)
            arms[name] = {"size_mb": size, "rows": n,
                          **measure(torch_runner(logits_of(model)), tok, texts[:n], gold[:n], max_length)}
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in arms[name].items()}, flush=True)
        for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
            export_model(src, tmp / name, "onnx", quantize=quantize, rows=64)
            run = ort_runner(session(tmp / name / "model.onnx"), "logits")
            arms[name] = {"size_mb": size_mb(tmp / name, "*.onnx"), "rows": len(texts),
                          **measure(run, tok, texts, gold, max_length)}
            print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in arms[name].items()}, flush=True)
    base = arms["pytorch_fp32"]
    for arm in arms.values():
        if "macro_f1" in arm:  # an arm scored on a sample has no delta against the whole split
            arm["macro_f1_delta"] = arm["macro_f1"] - base["macro_f1"] if arm["rows"] == base["rows"] else None
            arm["speedup_batch1"] = base["p50_ms_batch1"] / arm["p50_ms_batch1"]
            arm["speedup_batch32"] = arm["texts_per_s_batch32"] / base["texts_per_s_batch32"]
    onnx8, student = arms["onnx_int8"], arms["pruned_fp32"]
    arms["pruned_fp32"]["compress_s"] = prune_s
    result = {"setup": {"model": str(src.resolve()), "rows": len(rows), "threads": torch.get_num_threads(),
                        "pruning": {"ffn_keep": args.prune_ffn, "layers": args.layers, "epochs": args.epochs}},
              "arms": arms,
              "targets": {"onnx_int8_speedup_batch1": {"target": 2.5, "value": onnx8["speedup_batch1"],
                                                       "met": onnx8["speedup_batch1"] >= 2.5},
                          "onnx_int8_macro_f1_lost": {"target": 0.01, "value": -onnx8["macro_f1_delta"],
                                                      "met": -onnx8["macro_f1_delta"] <= 0.01},
                          "pruned_student_speedup_batch1": {"target": 2.0, "value": student["speedup_batch1"],
                                                            "met": student["speedup_batch1"] >= 2.0},
                          "pruned_student_macro_f1_lost": {"target": 0.015, "value": -student["macro_f1_delta"],
                                                           "met": -student["macro_f1_delta"] <= 0.015},
                          "distilled_student": "the pruned student is distilled from its teacher (train.distill); "
                                               "a student of another shape trained with train.distill alone is "
                                               "not measured here"}}
    print(f"wrote {write_result('compression', result)}")


if __name__ == "__main__":
    main()
