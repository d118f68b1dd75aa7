"""Token-level distillation for causal LMs (`train.distill` on a `text` or `sft` run): a new small decoder built
on SmolLM2's tokenizer (`model.base: scratch`, `model.scratch.tokenizer`) trained on the tweets' text, with and
without SmolLM2-135M-Instruct as its teacher — the same steps, batches, seed and learning rate in both arms.

Measured: test perplexity of each student (and of the teacher, for scale) on the same held-out documents, and
each arm's wall time (the teacher's forward is the price of distillation; the arms run one after the other, so
other load on the machine skews that ratio). Writes benchmarks/results/distill_lm.json.

    python benchmarks/distill_lm.py [--steps 150] [--test-docs 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, write_result  # noqa: E402

from tunelab.config import validate  # noqa: E402
from tunelab.data.dataset import load_split  # noqa: E402
from tunelab.models import load_causal_lm, load_model_dir  # noqa: E402
from tunelab.tasks.causal_lm import CausalLMTask  # noqa: E402
from tunelab.train.loop import train  # noqa: E402

TEACHER = "builtin:smollm2-135m-instruct"


def config(data: Path, steps: int, distill: dict | None) -> dict:
    return {"name": "distill-lm", "task": "causal_lm",
            "model": {"base": "scratch", "max_length": 128,
                      "scratch": {"tokenizer": TEACHER, "hidden_size": 256, "layers": 4, "heads": 4}},
            "data": {"dir": str(data), "prepare": {"source": "builtin:tweets-sentiment", "task": "text"},
                     "max_eval_examples": 200},
            "method": {"name": "full"},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "schedule": "cosine", "eval_every": 0,
                      "seed": 0, "precision": "fp32", "distill": distill}}


def perplexity(model, tok, docs: list[dict]) -> float:
    task = CausalLMTask(tok, 128, packing=True)
    return task.evaluate(model, task.encode(docs), batch_size=16)["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--test-docs", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=2.0)
    args = ap.parse_args()
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, distill in (("gold only", None),
                              ("distilled", {"teacher": TEACHER, "alpha": args.alpha,
                                             "temperature": args.temperature})):
            start = time.perf_counter()
            result = train(validate(config(tmp / "ds", args.steps, distill)), tmp / name, show_progress=False)
            seconds = time.perf_counter() - start
            docs = load_split(tmp / "ds", "test")[:args.test_docs]
            model, tok, _ = load_model_dir(tmp / name / "model")
            arms[name] = {"test_perplexity": perplexity(model, tok, docs), "train_s": seconds,
                          "steps": result["steps"], "tokens_per_s": result["tokens_per_s"],
                          "validation": result["validation"]}
            print(name, arms[name], flush=True)
        teacher, tok, _, _ = load_causal_lm(TEACHER)
        arms["teacher (SmolLM2-135M-Instruct)"] = {"test_perplexity": perplexity(teacher, tok, docs)}
    gold, kd = arms["gold only"], arms["distilled"]
    payload = {"machine": machine(), "steps": args.steps, "batch": "8 x 128 tokens", "test_docs": args.test_docs,
               "alpha": args.alpha, "temperature": args.temperature, "arms": arms,
               "perplexity_ratio_distilled_vs_gold": kd["test_perplexity"] / gold["test_perplexity"],
               "time_ratio_distilled_vs_gold": kd["train_s"] / gold["train_s"]}
    print(write_result("distill_lm", payload))
    for name, arm in arms.items():
        print(f"{name:32} perplexity {arm['test_perplexity']:8.1f}" +
              (f"   {arm['train_s']:6.0f} s" if "train_s" in arm else ""))


if __name__ == "__main__":
    main()
