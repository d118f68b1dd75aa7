"""`--format hf`: the model dir as one plain Hugging Face folder that `transformers` alone loads.

Adapters are merged (`merge.py`); labels stay in `config.json` (`id2label`), the tokenizer and its chat template
beside the weights, and a generator's stop tokens become its `generation_config.eos_token_id`, so a plain
`generate()` stops where tunelab's does. Parity: the folder is loaded back by the task's `AutoModelFor…` class and
its logits are compared with the unmerged model's on the same rows (max |Δ| ≤ 1e-4).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tunelab.errors import UserError
from tunelab.merge import check_mergeable, merged
from tunelab.export.parity import batched_outputs, compare, logits_of, texts_of, torch_runner
from tunelab.model_files import files_manifest
from tunelab.models import load_model_dir, max_length_of
from tunelab.tasks import task_spec

THRESHOLDS = {"max_abs_diff": ("max", 1e-4), "top1_agreement": ("min", 1.0)}


def write_hf(d: Path, meta: dict, out: Path, rows: list[dict], quantize: str | None = None,
             thresholds: dict | None = None, data_dir: str | None = None) -> dict:
    """Write the merged plain model of model dir `d` into `out` -> the parity record (figures, thresholds,
    files)."""
    if quantize:
        raise UserError("--quantize applies to --format onnx (int8); an hf export keeps the trained precision")
    method = check_mergeable(meta, d)
    model, tok, meta = load_model_dir(d)
    texts, max_length = texts_of(rows), max_length_of(meta)
    reference = batched_outputs(torch_runner(logits_of(model)), tok, texts, max_length)
    plain = merged(model)
    stops = [tok.convert_tokens_to_ids(s) for s in meta.get("stop") or []]
    if task_spec(meta["task"]).generates and stops:
        plain.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        plain.generation_config.pad_token_id = tok.pad_token_id
    plain.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model, plain
    loader = getattr(transformers, task_spec(meta["task"]).auto_class)
    reloaded = loader.from_pretrained(out, dtype=torch.float32).eval()  # as a user would: no peft, no tunelab
    figures = compare(reference, batched_outputs(torch_runner(logits_of(reloaded)), tok, texts, max_length))
    return {"method": method, "figures": figures, "thresholds": THRESHOLDS if thresholds is None else thresholds,
            "files": files_manifest(out)}
