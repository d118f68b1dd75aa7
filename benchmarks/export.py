"""Export parity and speed of the quickstart classifier (MiniLM-L6 fine-tuned on the built-in tweets), measured on
its whole test split:

1. ONNX fp32 in ONNX Runtime vs the PyTorch model: max |Δlogit| (target ≤ 1e-4), top-1 agreement, macro-F1 on
   both sides, latency p50 at batch 1 and throughput at batch 32 (same threads both sides; PyTorch fp32 eager is
   the anchor);
2. ONNX int8 (dynamic, per-channel): macro-F1 lost (target ≤ 1.0 point), size, the same speeds;
3. hf: the model as a plain Hugging Face folder, logits equal within 1e-4 when loaded back.

Writes benchmarks/results/export.json. Needs the model `make demo` trains (`runs/quickstart/model`), or --model.

    python benchmarks/export.py [--model runs/quickstart/model] [--rows 0 (= the whole test split)]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

from tunelab.export import export_model  # noqa: E402
from tunelab.models import read_meta  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/quickstart/model")
    ap.add_argument("--rows", type=int, default=0, help="parity rows (0: the whole test split)")
    args = ap.parse_args()
    meta = read_meta(args.model)
    rows = args.rows or sum(1 for _ in open(Path(meta["data"]["path"]) / "test.jsonl", encoding="utf-8"))
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, quantize in (("onnx_fp32", "onnx", None), ("onnx_int8", "onnx", "int8"), ("hf", "hf", None)):
            start = time.perf_counter()
            record = export_model(args.model, Path(tmp) / name, fmt, quantize=quantize, rows=rows)
            arms[name] = {"export_s": time.perf_counter() - start, **record}
            f = record["figures"]
            print(f"{name:10} max|Δ| {f['max_abs_diff']:.3g} · top-1 {f['top1_agreement']:.4f}"
                  + (f" · macro-F1 {f['metric_pytorch']:.4f} -> {f['metric_onnx']:.4f}" if "metric" in f else "")
                  + (f" · p50 {f['pytorch_p50_ms_batch1']:.1f} -> {f['onnx_p50_ms_batch1']:.1f} ms"
                     f" · batch 32 {f['pytorch_texts_per_s_batch32']:.0f} -> {f['onnx_texts_per_s_batch32']:.0f}"
                     " texts/s" if "onnx_p50_ms_batch1" in f else ""))
    fp32, int8 = arms["onnx_fp32"]["figures"], arms["onnx_int8"]["figures"]
    result = {
        "setup": {"model": str(Path(args.model).resolve()), "base": meta["base"]["ref"], "rows": rows},
        "arms": arms,
        "ratios": {"onnx_fp32_vs_pytorch_latency_p50": fp32["pytorch_p50_ms_batch1"] / fp32["onnx_p50_ms_batch1"],
                   "onnx_fp32_vs_pytorch_throughput": fp32["onnx_texts_per_s_batch32"]
                   / fp32["pytorch_texts_per_s_batch32"],
                   "onnx_int8_vs_pytorch_latency_p50": int8["pytorch_p50_ms_batch1"] / int8["onnx_p50_ms_batch1"],
                   "onnx_int8_vs_pytorch_throughput": int8["onnx_texts_per_s_batch32"]
                   / int8["pytorch_texts_per_s_batch32"],
                   "int8_size_vs_fp32": int8["size_mb"] / int8["fp32_size_mb"]},
        "targets": {"onnx_fp32_max_abs_diff": {"target": 1e-4, "value": fp32["max_abs_diff"],
                                               "met": fp32["max_abs_diff"] <= 1e-4},
                    "onnx_int8_macro_f1_lost": {"target": 0.01, "value": int8["metric_drop"],
                                                "met": int8["metric_drop"] <= 0.01},
                    "gguf": "not measured yet: the GGUF writer is not built"},
    }
    path = write_result("export", result)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
