"""lm-evaluation-harness through `tunelab serve` vs lm-eval's own in-process `hf` model, side by side.

The built-in SmolLM2-135M-Instruct, the local tasks in examples/lm-eval:
1. `tunelab_mc` (24 multiple-choice questions, English and Chinese, 96 scored continuations) through
   `local-completions` against `tunelab serve` (token-id prompts, echo + logprobs, the server's tokenizer through
   /tokenize: lm-eval finds it on its own), and through lm-eval's `hf` model on the same GGUF file in fp32;
2. `tunelab_arith` (12 sums, generated) through `local-chat-completions` against the same server.
Reported: accuracy of both, the largest and mean |Δ log-likelihood| per continuation, how often their greedy
flags agree, and each run's wall time (lm-eval's start-up and the hf model's load included).

Writes benchmarks/results/lm_eval_agreement.json.

    python benchmarks/lm_eval_agreement.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from serve_load import BASE, Server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "examples" / "lm-eval"
MODEL = "smollm2-135m-instruct"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lm_eval(out: Path, task: str, *args: str) -> tuple[dict, list[dict], float]:
    """One lm_eval CLI run from the repository root -> (its results, its samples by doc, wall seconds)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", *args, "--include_path", str(TASKS), "--tasks", task,
                    "--output_path", str(out), "--log_samples"], check=True, cwd=ROOT,
                   env={**os.environ, **OFFLINE}, capture_output=True)
    seconds = time.perf_counter() - start
    found = {p.name.split("_")[0]: p for p in out.rglob("*.json*")}
    results = json.loads(found["results"].read_text())["results"][task]
    samples = sorted((json.loads(line) for line in found["samples"].read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    return results, samples, seconds


def main() -> None:
    from tunelab.assets import builtin_path

    gguf = builtin_path(BASE)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = Server([BASE, "--embedding-model", "none"], tmp / "server.log")
        try:
            served, served_samples, served_s = lm_eval(
                tmp / "served", "tunelab_mc", "--model", "local-completions", "--model_args",
                f"model={MODEL},base_url={server.url}/v1/completions,num_concurrent=2", "--batch_size", "8")
            arith, _, arith_s = lm_eval(
                tmp / "arith", "tunelab_arith", "--model", "local-chat-completions", "--model_args",
                f"model={MODEL},base_url={server.url}/v1/chat/completions,num_concurrent=4",
                "--apply_chat_template")
        finally:
            server.stop()
        local, local_samples, local_s = lm_eval(
            tmp / "hf", "tunelab_mc", "--model", "hf", "--model_args",
            f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", "--batch_size", "8")
    pairs = [(float(a[0][0]), float(b[0][0]), a[0][1] == b[0][1])
             for x, y in zip(served_samples, local_samples) for a, b in zip(x["resps"], y["resps"])]
    deltas = [abs(a - b) for a, b, _ in pairs]
    payload = {
        "model": BASE, "tasks": str(TASKS.relative_to(ROOT)),
        "multiple_choice": {
            "continuations": len(pairs),
            "served_acc": served["acc,none"], "hf_acc": local["acc,none"],
            "served_acc_norm": served["acc_norm,none"], "hf_acc_norm": local["acc_norm,none"],
            "max_abs_delta_loglikelihood": max(deltas), "mean_abs_delta_loglikelihood": sum(deltas) / len(deltas),
            "greedy_flags_agree": sum(g for _, _, g in pairs),
            "served_seconds": round(served_s, 1), "hf_seconds": round(local_s, 1)},
        "generation": {"exact_match": arith["exact_match,last-number"], "seconds": round(arith_s, 1)},
    }
    print(json.dumps(payload, indent=2))
    print("wrote", write_result("lm_eval_agreement", payload))


if __name__ == "__main__":
    main()
