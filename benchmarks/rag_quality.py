"""The Python FAQ support assistant, measured end to end on its held-out question set
(examples/python-faq/questions.jsonl: 80 in-scope user questions, 8 of them follow-ups, and 25 out of scope, written
before any tuning and used for nothing else).

1. Retrieval with base MiniLM: MRR@10 and recall@1/5/10 for BM25 alone, dense alone and hybrid (RRF), and the
   hand-off of the retrieval gate (best dense score under the threshold) on the out-of-scope questions.
2. The fine-tuned retriever: `tunelab index training-data` (pairs from the FAQ's own question headings), then
   `tunelab train examples/python-faq/retriever-minilm.yaml`, the index rebuilt with it, the same scores.
3. Answers: the built-in SmolLM2-135M-Instruct as it is, and the same model after the SFT of
   examples/python-faq/assistant-smollm2-lora.yaml (conversations built from the knowledge base), answering the
   first `--answers` questions from the fine-tuned retriever's passages: supported-answer rate, ROUGE-L, hand-off
   precision / recall / F1 of the whole assistant, and the latency of an answer (retrieval, generation, check).

Targets (issue): hybrid MRR@10 ≥ BM25 + 0.05; the fine-tuned retriever ≥ base MiniLM + 0.05 MRR@10; hand-off
F1 ≥ 0.8. Writes benchmarks/results/rag_quality.json.

    python benchmarks/rag_quality.py [--work runs/python-faq-bench] [--answers 40] [--skip-sft]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAQ = ROOT / "examples" / "python-faq"
INSTRUCT = "builtin:smollm2-135m-instruct"


def train(config: Path, out: Path, data_dir: Path, source: Path) -> Path:
    """`tunelab train CONFIG` in its own process, on the given training data -> the model dir."""
    if not (out / "model").is_dir():
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), "--out", str(out), "--overwrite",
                        f"data.dir={data_dir}", f"data.prepare.source={source}"], check=True)
    return out / "model"


def training_seconds(run: Path) -> float:
    """The run's training time, from the last line of its metrics.jsonl (also for a run reused from before)."""
    last = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1]
    return round(__import__("json").loads(last)["elapsed_s"], 1)


def retrieval_table(report: dict) -> dict:
    return {mode: report["retrieval"][mode] for mode in ("bm25", "dense", "hybrid")}


def answers(assistant, questions, model: str) -> dict:
    from tunelab.generate import GenerationParams, generate, load_generator
    from tunelab.rag.evaluate import answer_scores

    gen, params = load_generator(model), GenerationParams(max_new_tokens=160)
    scores, rows = answer_scores(assistant, questions, lambda m: generate(gen, m, params, chat=True)["text"])
    return {"model": model, **scores, "examples": [
        {k: r[k] for k in ("id", "question", "model_answer", "reply", "handoff", "citations")} for r in rows[:6]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "python-faq-bench")
    ap.add_argument("--answers", type=int, default=40, help="questions answered by each model (generation is slow)")
    ap.add_argument("--skip-sft", action="store_true", help="answer with the built-in instruct model only")
    args = ap.parse_args()

    from tunelab.rag.answer import Assistant
    from tunelab.rag.evaluate import evaluate_rag, load_questions
    from tunelab.rag.index import Index
    from tunelab.rag.training import retrieval_pairs, sft_conversations

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    questions = load_questions(FAQ / "questions.jsonl")
    base_index, _ = Index.build([FAQ / "docs"], work / "index", overwrite=True)
    base = Assistant(base_index)
    base_report = evaluate_rag(base, questions)

    data = work / "training-data"
    data.mkdir(exist_ok=True)
    for name, rows in (("retrieval.jsonl", retrieval_pairs(base_index.chunks)),
                       ("sft.jsonl", sft_conversations(base))):
        (data / name).write_text("".join(__import__("json").dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                 encoding="utf-8")
    retriever = train(FAQ / "retriever-minilm.yaml", work / "retriever", work / "retrieval-data",
                      data / "retrieval.jsonl")
    tuned_index, _ = Index.build([FAQ / "docs"], work / "index-tuned", str(retriever), overwrite=True)
    tuned = Assistant(tuned_index)
    tuned_report = evaluate_rag(tuned, questions)

    asked = questions[:args.answers]
    models = [INSTRUCT]
    if not args.skip_sft:
        models.append(str(train(FAQ / "assistant-smollm2-lora.yaml", work / "assistant", work / "sft-data",
                                data / "sft.jsonl")))
    answered = [answers(tuned, asked, m) for m in models]

    b, t = retrieval_table(base_report), retrieval_table(tuned_report)
    payload = {
        "questions": {"total": len(questions), "in_scope": base_report["in_scope"], "answered_per_model": len(asked)},
        "retrieval": {"base_minilm": b, "fine_tuned": t},
        "handoff_gate": {"base_minilm": base_report["handoff_gate"], "fine_tuned": tuned_report["handoff_gate"]},
        "training_seconds": {"retriever": training_seconds(work / "retriever"),
                             **({} if args.skip_sft else {"assistant_sft": training_seconds(work / "assistant")})},
        "answers": answered,
        "targets": {
            "hybrid_mrr_ge_bm25_plus_0.05": b["hybrid"]["mrr@10"] >= b["bm25"]["mrr@10"] + 0.05,
            "fine_tuned_dense_mrr_ge_base_plus_0.05": t["dense"]["mrr@10"] >= b["dense"]["mrr@10"] + 0.05,
            "fine_tuned_hybrid_mrr_ge_base_plus_0.05": t["hybrid"]["mrr@10"] >= b["hybrid"]["mrr@10"] + 0.05,
            "handoff_f1_ge_0.8_gate": tuned_report["handoff_gate"]["f1"] >= 0.8,
            **{f"handoff_f1_ge_0.8_{Path(a['model']).parent.name or a['model']}": a["handoff"]["f1"] >= 0.8
               for a in answered}},
    }
    for name, table in (("base MiniLM", b), ("fine-tuned", t)):
        for mode, m in table.items():
            print(f"{name:12s} {mode:7s} MRR@10 {m['mrr@10']:.3f}  R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f}  "
                  f"R@10 {m['recall@10']:.3f}")
    for a in answered:
        print(f"{a['model']}: supported {a['supported_answer_rate']:.3f} ROUGE-L {a['rouge_l']:.3f} hand-off F1 "
              f"{a['handoff']['f1']:.3f} answer p50 {a['answer_seconds_p50']} s p95 {a['answer_seconds_p95']} s")
    print(payload["targets"])
    print("wrote", write_result("rag_quality", payload))


if __name__ == "__main__":
    main()
