"""Evaluation of causal_lm and sft models, before (the base) and after (the fine-tuned model):

- perplexity on the split (all tokens for causal_lm; assistant tokens for sft);
- sft: answers generated (greedy) for the last assistant turn of up to N conversations, scored against
  the reference with ROUGE-L F1 and exact match (case/whitespace/punctuation-insensitive);
- the forgetting probe: perplexity on a sample of general text before vs after, next to the task gain.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

from tunelab.config import PrepareOptions
from tunelab.data.dataset import load_split
from tunelab.data.prepare import resolve_source
from tunelab.data.read import read_rows
from tunelab.errors import UserError
from tunelab.tasks import task_spec

# tunelab.tasks.causal_lm, tunelab.tasks.sft, tunelab.generate and tunelab.models load torch (~1.2 s); they are
# imported inside the functions that run a model, so the scores (rouge_l, exact_match) import without it.

_PUNCT = str.maketrans("", "", string.punctuation)


def _norm_tokens(s: str) -> list[str]:
    return s.lower().translate(_PUNCT).split()


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over lower-cased, punctuation-free words (longest common subsequence)."""
    a, b = _norm_tokens(pred), _norm_tokens(ref)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def exact_match(pred: str, ref: str) -> bool:
    return _norm_tokens(pred) == _norm_tokens(ref)


def lm_perplexity(model, tokenizer, rows: list[dict], task: str, block: int, batch_size: int = 8,
                  per_block: bool = False) -> dict:
    """{"loss", "perplexity", "tokens"} of `rows` ({"text"} or {"messages"}) under `model` (with `per_block`, each
    block's (loss sum, tokens) under `blocks`)."""
    from tunelab.tasks.causal_lm import CausalLMTask
    from tunelab.tasks.sft import SFTTask

    t = (SFTTask if task_spec(task).conversations else CausalLMTask)(tokenizer, block, packing=True)
    return t.evaluate(model, t.encode(rows), batch_size, per_block=per_block)


def generation_scores(gen, rows: list[dict], n: int, max_new_tokens: int, seed: int = 0, show: int = 3) -> dict:
    """Greedy answers to the last assistant turn of up to `n` conversations (seeded sample)."""
    from tunelab.generate import GenerationParams, generate

    usable = [r for r in rows if r["messages"][-1]["role"] == "assistant"]
    rng = np.random.default_rng(seed)
    pick = [usable[i] for i in sorted(rng.choice(len(usable), min(n, len(usable)), replace=False))]
    params = GenerationParams(max_new_tokens=max_new_tokens)
    rl, em, samples = [], [], []
    for r in pick:
        ref = r["messages"][-1]["content"]
        out = generate(gen, r["messages"][:-1], params, chat=True)["text"].strip()
        rl.append(rouge_l(out, ref))
        em.append(exact_match(out, ref))
        if len(samples) < show:
            samples.append({"prompt": r["messages"][-2]["content"], "reference": ref, "answer": out})
    return {"n": len(pick), "rouge_l": float(np.mean(rl)) if rl else 0.0,
            "exact_match": float(np.mean(em)) if em else 0.0, "samples": samples, "rouge_l_values": rl}


def general_text(source: str | None, n: int, seed: int = 0) -> tuple[str, list[dict]]:
    """(name, rows {"text"}) of general text for the forgetting probe: a .txt file (paragraphs), a
    prepared dataset dir, or by default the built-in tweets' texts (everyday English)."""
    if source is None:
        path, text_col, _ = resolve_source("builtin:tweets-sentiment", PrepareOptions())
        _, rows = read_rows(path)
        texts = [str(r.fields.get(text_col) or "") for r in rows]
        name = "builtin:tweets-sentiment"
    else:
        p = Path(source)
        if p.is_dir():
            texts = [r.get("text") or "" for r in load_split(p, "test")]
        elif p.is_file():
            texts = re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="replace"))
        else:
            raise UserError(f"general text not found: {source}")
        name = str(source)
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise UserError(f"no general text in {name}")
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(texts), min(n, len(texts)), replace=False))
    return name, [{"text": texts[i]} for i in pick]


def evaluate_language(model, tok, meta: dict, rows: list[dict], eval_cfg, device: str = "cpu", seed: int = 0) -> dict:
    """The report body for a causal_lm / sft model dir (see the module docstring)."""
    from tunelab.generate import Generator
    from tunelab.models import load_causal_lm

    task, block = meta["task"], meta.get("max_length", 512)
    bs = min(eval_cfg.batch_size, 8)  # blocks of up to `block` tokens each
    per_block = eval_cfg.bootstrap > 0
    report = {"after": lm_perplexity(model, tok, rows, task, block, bs, per_block)}
    base_ref = meta["base"]["ref"]
    base = None
    if base_ref != "scratch":
        base, base_tok, _, _ = load_causal_lm(base_ref)
        base.to(device).eval()
        if task_spec(task).conversations and not getattr(base_tok, "chat_template", None):
            base_tok.chat_template = tok.chat_template
        report["before"] = lm_perplexity(base, base_tok, rows, task, block, bs, per_block)
    if task_spec(task).conversations and eval_cfg.generation_samples:
        stop = list(meta.get("stop") or [tok.eos_token])
        report["after"]["generation"] = generation_scores(Generator(model, tok, stop, "fine-tuned"), rows,
                                                          eval_cfg.generation_samples, eval_cfg.max_new_tokens)
        if base is not None:
            report["before"]["generation"] = generation_scores(Generator(base, base_tok, stop, base_ref), rows,
                                                               eval_cfg.generation_samples, eval_cfg.max_new_tokens)
    if base is not None:
        name, general = general_text(eval_cfg.general_text, eval_cfg.general_samples)
        before = lm_perplexity(base, base_tok, general, "causal_lm", block, bs)["perplexity"]
        after = lm_perplexity(model, tok, general, "causal_lm", block, bs)["perplexity"]
        report["forgetting"] = {"general_text": name, "rows": len(general), "perplexity_before": before,
                                "perplexity_after": after, "change": after / before - 1}
    language_statistics(report, eval_cfg.bootstrap, seed)
    return report


def language_statistics(report: dict, resamples: int, seed: int) -> None:
    """Adds the perplexity's interval (blocks resampled) and ROUGE-L's (answers resampled) to `after` and `before`,
    and their paired after - before differences under `comparisons["before"]` (see evaluate/significance.py);
    drops the per-block and per-answer values they are computed from."""
    from tunelab.evaluate import significance as sg

    sides = {k: report[k] for k in ("after", "before") if report.get(k)}
    blocks = {k: m.pop("blocks", None) for k, m in sides.items()}
    rouge = {k: m["generation"].pop("rouge_l_values") for k, m in sides.items() if m.get("generation")}
    if not resamples:
        return
    report["statistics"] = sg.settings(resamples, seed, "block of tokens (ROUGE-L: answer)")
    for k, m in sides.items():
        m["intervals"] = {"perplexity": sg.perplexity_interval(blocks[k], resamples, seed)}
        if k in rouge:
            m["intervals"]["rouge_l"] = sg.mean_interval(rouge[k], resamples, seed)
    if "before" not in sides:
        return
    paired = sg.compare_perplexity(blocks["after"], blocks["before"], resamples, seed)
    comparison = paired or {"rows": 0, "perplexity": None}
    if "after" in rouge and "before" in rouge and len(rouge["after"]) == len(rouge["before"]) and rouge["after"]:
        comparison["rouge_l"] = sg.compare_means(rouge["after"], rouge["before"], resamples, seed)
    report["comparisons"] = {"before": comparison}
