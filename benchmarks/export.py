"""Export parity and speed of the quickstart classifier (MiniLM-L6 fine-tuned on the built-in tweets), measured on
its whole test split:

1. ONNX fp32 in ONNX Runtime vs the PyTorch model: max |Δlogit| (target ≤ 1e-4), top-1 agreement, macro-F1 on
   both sides, latency p50 at batch 1 and throughput at batch 32 (same threads both sides; PyTorch fp32 eager is
   the anchor);
2. ONNX int8 (dynamic, per-channel): macro-F1 lost (target ≤ 1.0 point), size, the same speeds;
3. hf: the model as a plain Hugging Face folder, logits equal within 1e-4 when loaded back;
   and the base encoder (--encoder) as ONNX sentence embeddings, fp32 and int8: cosine to PyTorch's vectors,
   nearest-neighbour agreement and recall@5 over the same rows, the same speeds;
4. GGUF of the built-in SmolLM2-135M-Instruct (--decoder) over the first --gguf-rows tweets of the same test split:
   F16, Q8_0 and Q4_0 read back by transformers (mean KL, top-1 agreement, perplexity ratio; targets for Q8_0:
   top-1 ≥ 99 %, mean KL ≤ 1e-3) and run by llama.cpp (greedy agreement, top-5 overlap). The anchor is the
   reference quantiser (`gguf.quants.quantize`, the rounding of llama.cpp's converter: each block's scale from
   its largest value) writing the same file, beside tunelab's searched, activation-weighted scales.

The GGUF arms run tunelab's quantiser (searched scales, then GPTQ levels), the same with searched scales only, and
the reference.

Writes benchmarks/results/export.json. Needs the model `make demo` trains (`runs/quickstart/model`), or --model.
`--gguf-only` measures the GGUF arms again (they need only the decoder and a dataset) and keeps the other arms of
the existing results file, saying so in it.

    python benchmarks/export.py [--model runs/quickstart/model] [--rows 0 (= the whole test split)]
                                [--encoder builtin:minilm-l6] [--decoder builtin:smollm2-135m-instruct]
                                [--gguf-rows 100] [--gguf-only --data data/tweets]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, write_result  # noqa: E402

import gguf  # noqa: E402

from tunelab.export import export_model, quants  # noqa: E402
from tunelab.models import read_meta  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/quickstart/model")
    ap.add_argument("--rows", type=int, default=0, help="parity rows (0: the whole test split)")
    ap.add_argument("--encoder", default="builtin:minilm-l6", help="the base encoder exported for embeddings")
    ap.add_argument("--decoder", default="builtin:smollm2-135m-instruct", help="the decoder exported to GGUF")
    ap.add_argument("--gguf-rows", type=int, default=100, help="test rows the GGUF parity runs on (0: skip GGUF)")
    ap.add_argument("--gguf-only", action="store_true",
                    help="measure the GGUF arms again and keep the others from the existing results file")
    ap.add_argument("--data", default="data/tweets", help="with --gguf-only: the dataset of the GGUF rows")
    args = ap.parse_args()
    if args.gguf_only:
        return _gguf_only(args)
    meta = read_meta(args.model)
    rows = args.rows or sum(1 for _ in open(Path(meta["data"]["path"]) / "test.jsonl", encoding="utf-8"))
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, fmt, quantize in (("onnx_fp32", args.model, "onnx", None),
                                            ("onnx_int8", args.model, "onnx", "int8"),
                                            ("hf", args.model, "hf", None),
                                            ("onnx_embeddings_fp32", args.encoder, "onnx", None),
                                            ("onnx_embeddings_int8", args.encoder, "onnx", "int8")):
            start = time.perf_counter()
            record = export_model(source, Path(tmp) / name, fmt, quantize=quantize, rows=rows,
                                  data_dir=meta["data"]["path"])
            arms[name] = {"export_s": time.perf_counter() - start, **record}
            f = record["figures"]
            print(f"{name:10} max|Δ| {f['max_abs_diff']:.3g}"
                  + (f" · top-1 {f['top1_agreement']:.4f}" if "top1_agreement" in f else "")
                  + (f" · cosine ≥ {f['min_cosine']:.4f} · nearest same {f['neighbour_agreement']:.3f}"
                     f" · recall@5 {f['neighbour_recall_at_5']:.3f}" if "min_cosine" in f else "")
                  + (f" · macro-F1 {f['metric_pytorch']:.4f} -> {f['metric_onnx']:.4f}" if "metric" in f else "")
                  + (f" · p50 {f['pytorch_p50_ms_batch1']:.1f} -> {f['onnx_p50_ms_batch1']:.1f} ms"
                     f" · batch 32 {f['pytorch_texts_per_s_batch32']:.0f} -> {f['onnx_texts_per_s_batch32']:.0f}"
                     " texts/s" if "onnx_p50_ms_batch1" in f else ""))
        if args.gguf_rows:
            arms.update(_gguf_arms(args.decoder, meta["data"]["path"], args.gguf_rows, Path(tmp)))
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
                    **_gguf_targets(arms)},
    }
    path = write_result("export", result)
    for k, v in result["ratios"].items():
        print(f"{k}: {v:.2f}x")
    print(f"wrote {path}")


def _gguf_only(args) -> None:
    """The GGUF arms measured again into the existing results file; its other arms stay as they were."""
    path = RESULTS / "export.json"
    result = json.loads(path.read_text())
    for key in ("benchmark", "machine"):  # written afresh
        result.pop(key)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_arms = _gguf_arms(args.decoder, args.data, args.gguf_rows, Path(tmp))
    result["arms"] = {**{k: v for k, v in result["arms"].items() if not k.startswith("gguf_")}, **gguf_arms}
    result["targets"] = {**{k: v for k, v in result["targets"].items() if not k.startswith("gguf")},
                         **_gguf_targets(result["arms"])}
    result["gguf_arms"] = f"measured again on their own ({time.strftime('%Y-%m-%d')}); the other arms are earlier"
    print(f"wrote {write_result('export', result)}")


def _gguf_arms(decoder: str, data: str, rows: int, tmp: Path) -> dict:
    """The decoder as GGUF of each type: tunelab's quantiser (searched scales, GPTQ levels), searched scales only,
    and (Q8_0, Q4_0) the reference one; no threshold stops an arm, the targets are judged after."""
    arms = {}
    fitted = quants.quantize
    variants = {"reference": lambda data, kind, hessian=None, compensate=True: gguf.quants.quantize(data, kind),
                "searched": lambda data, kind, hessian=None, compensate=True: fitted(data, kind, hessian, False)}
    for name, qtype, variant in (("gguf_f16", "f16", None), ("gguf_q8_0", "q8_0", None),
                                 ("gguf_q8_0_searched", "q8_0", "searched"),
                                 ("gguf_q8_0_reference", "q8_0", "reference"), ("gguf_q4_0", "q4_0", None),
                                 ("gguf_q4_0_searched", "q4_0", "searched"),
                                 ("gguf_q4_0_reference", "q4_0", "reference")):
        quants.quantize = variants.get(variant, fitted)  # reference: each block's scale from its largest value
        start = time.perf_counter()
        try:
            record = export_model(decoder, tmp / name, "gguf", quantize=qtype, rows=rows, data_dir=data,
                                  thresholds={})
        finally:
            quants.quantize = fitted
        arms[name] = {"export_s": time.perf_counter() - start, **record}
        f = record["figures"]
        print(f"{name:20} KL {f['mean_kl']:.2e} · top-1 {f['top1_agreement']:.4f} over {f['tokens']} tokens"
              f" · ppl ratio {f['perplexity_ratio']:.4f} · llama.cpp greedy {f['llama_cpp_greedy_agreement']:.3f}"
              f" top-5 {f['llama_cpp_top5_overlap']:.2f} · {f['size_mb']:.1f} MB · {arms[name]['export_s']:.0f} s")
    return arms


def _gguf_targets(arms: dict) -> dict:
    if "gguf_q8_0" not in arms:
        return {"gguf": "not measured (--gguf-rows 0)"}
    f = arms["gguf_q8_0"]["figures"]
    return {"gguf_q8_0_top1_agreement": {"target": 0.99, "value": f["top1_agreement"],
                                         "met": f["top1_agreement"] >= 0.99},
            "gguf_q8_0_mean_kl": {"target": 1e-3, "value": f["mean_kl"], "met": f["mean_kl"] <= 1e-3},
            "gguf_q8_0_tokens": {"target": 2000, "value": f["tokens"], "met": f["tokens"] >= 2000}}


if __name__ == "__main__":
    main()
