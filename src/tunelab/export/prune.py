"""`tunelab compress --prune-ffn F --layers K`: a physically smaller encoder that vanilla `transformers` loads.

A BERT config holds one FFN width and one layer count for the whole model (and transformers 5 has no head
pruning), so this prunes what the format can express:
- FFN width, uniformly: every layer keeps the same number of intermediate neurons, each layer its own most
  important ones. A neuron's importance is the mean magnitude of its activation over training text times the
  norm of the output weights it feeds (how much it moves the layer's output);
- whole layers: `K` of them, evenly spaced from the first to the last (as DistilBERT keeps every other layer).
Then a short recovery fine-tune on the model's own training data (the training loop, full fine-tuning from the
pruned weights, distilled from the unpruned model by default: `train.distill`), whose model dir is the result:
`tunelab.json` says `compression: {prune: …}` and its parent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tunelab import __version__
from tunelab.artifacts import check_target, write_folder
from tunelab.data.dataset import load_split
from tunelab.errors import UserError
from tunelab.merge import check_mergeable, merged
from tunelab.export.parity import texts_of
from tunelab.model_files import files_manifest
from tunelab.models import META_FILE, load_model_dir, max_length_of, read_meta
from tunelab.tasks import refuse_stage, task_spec

IMPORTANCE_ROWS = 256  # training rows whose activations rank the FFN neurons


def _blocks(model) -> nn.ModuleList:
    """The transformer layers of a BERT-family encoder (`encoder.layer`, each with `intermediate.dense` and
    `output.dense`); anything else is a `UserError`."""
    body = getattr(model, "base_model", model)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not all(
            hasattr(b, "intermediate") and hasattr(b, "output") for b in layers):
        raise UserError(f"pruning reads BERT-family encoders (encoder.layer[i].intermediate / .output); this is "
                        f"'{model.config.model_type}'")
    return layers


@torch.inference_mode()
def neuron_importance(model, tok, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Per layer, per FFN neuron: mean |activation| over the real tokens of `texts` × the L2 norm of the output
    weights the neuron feeds."""
    blocks = _blocks(model)
    sums = [torch.zeros(b.intermediate.dense.out_features, dtype=torch.float64) for b in blocks]
    count = [0]
    mask_now: dict[str, torch.Tensor] = {}

    def hook(i):
        def record(module, inputs, output):
            m = mask_now["mask"].reshape(-1).bool()
            sums[i] += output.reshape(-1, output.shape[-1])[m].abs().double().sum(0)
        return record

    handles = [b.intermediate.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for start in range(0, len(texts), 32):
            enc = tok(texts[start:start + 32], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            mask_now["mask"] = enc["attention_mask"]
            count[0] += int(enc["attention_mask"].sum())
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [(s / max(1, count[0])).numpy() * b.output.dense.weight.detach().norm(dim=0).double().numpy()
            for s, b in zip(sums, blocks)]


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = layer.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    out = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(w)
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach()[rows] if rows is not None else layer.bias.detach())
    return out


def pruned(model, importance: list[np.ndarray], ffn_keep: float, layers: int | None) -> tuple[nn.Module, dict]:
    """The model with `layers` evenly spaced layers (all when None) and `ffn_keep` of each kept layer's FFN
    neurons (its most important), in place -> (model, what was kept)."""
    blocks = _blocks(model)
    total, width = len(blocks), blocks[0].intermediate.dense.out_features
    n = total if layers is None else layers
    if not 1 <= n <= total:
        raise UserError(f"--layers must be between 1 and {total} (the model has {total})")
    if not 0 < ffn_keep <= 1:
        raise UserError("--prune-ffn is the share of FFN neurons to keep, in (0, 1]")
    keep_layers = sorted({int(i) for i in np.round(np.linspace(0, total - 1, n))})
    k = max(1, int(round(ffn_keep * width)))
    kept = []
    for i in keep_layers:
        b = blocks[i]
        top = torch.as_tensor(np.sort(np.argsort(-importance[i], kind="stable")[:k]))
        b.intermediate.dense = _sliced(b.intermediate.dense, rows=top)
        b.output.dense = _sliced(b.output.dense, cols=top)
        kept.append(b)
    body = getattr(model, "base_model", model)
    body.encoder.layer = nn.ModuleList(kept)
    for j, b in enumerate(kept):  # layers that know their index (attention caches) learn the new one
        for m in b.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = j
    model.config.num_hidden_layers, model.config.intermediate_size = len(kept), k
    return model, {"layers_kept": keep_layers, "layers_of": total, "ffn_width": k, "ffn_width_of": width}


def compress_prune(model_dir: str | Path, out: str | Path, ffn_keep: float = 0.5, layers: int | None = None,
                   epochs: float = 1.0, lr: float = 5e-5, data_dir: str | None = None, distill: bool = True,
                   overwrite: bool = False, show_progress: bool = True) -> dict:
    """Prune the encoder in model dir `model_dir`, fine-tune it `epochs` on its training data to recover (learning
    from the unpruned model's soft labels too when `distill`), and write the result as the model dir `out` -> its
    `tunelab.json`."""
    from tunelab.config import validate  # the recovery run's config, and the loop it runs: this stage only
    from tunelab.train.loop import train

    d = Path(model_dir)
    check_target(Path(os.path.abspath(out)), "model", overwrite)  # before the recovery run, not after it
    refuse_stage(read_meta(d).get("task"), str(d), "compress")
    model, tok, meta = load_model_dir(d)
    spec = task_spec(meta["task"])
    if spec.generates:
        raise UserError(f"{d} holds a '{spec.name}' model; pruning is for encoders (classification, NER)")
    if (meta.get("compression") or {}).get("int8"):
        raise UserError(f"{d} is int8; prune the float model, then quantise")
    check_mergeable(meta, d)
    data = data_dir or (meta.get("data") or {}).get("path")
    if not data or not Path(data).is_dir():
        raise UserError(f"the recovery fine-tune needs {d}'s training data ({data or 'not recorded'}); "
                        "give --data DIR")
    model = merged(model).eval()
    max_length = max_length_of(meta)
    importance = neuron_importance(model, tok, texts_of(load_split(data, "train")[:IMPORTANCE_ROWS]), max_length)
    model, kept = pruned(model, importance, ffn_keep, layers)
    with tempfile.TemporaryDirectory(prefix="tunelab-prune-") as tmp:
        base = Path(tmp) / "pruned"
        model.save_pretrained(base, safe_serialization=True)
        tok.save_pretrained(base)
        cfg = validate({"task": meta["task"], "model": {"base": str(base), "max_length": max_length},
                        "data": {"dir": str(data)}, "method": {"name": "full"},
                        "train": {"epochs": epochs, "lr": lr, "seed": 0,
                                  "distill": {"teacher": str(d)} if distill else None},
                        "eval": {"baselines": []}})
        run = Path(tmp) / "recovery"
        train(cfg, run, show_progress=show_progress)
        result = json.loads((run / "model" / META_FILE).read_text())
        with write_folder(out, "model", overwrite) as folder:
            for p in (run / "model").iterdir():
                if p.name != META_FILE:
                    shutil.copy2(p, folder / p.name)
            new = {**result, "base": meta.get("base"), "method": {"name": "full"},
                   "compression": {**(meta.get("compression") or {}),
                                   "prune": {**kept, "ffn_keep": ffn_keep, "importance_rows": IMPORTANCE_ROWS,
                                             "recovery": {"epochs": epochs, "lr": lr, "data": str(data),
                                                          "distilled_from": str(d.resolve()) if distill else None}}},
                   "parent": {"model_dir": str(d.resolve()), "files": meta.get("files"),
                              "metrics": meta.get("metrics")},
                   "tunelab_version": __version__, "created": int(time.time()), "files": files_manifest(folder)}
            (folder / META_FILE).write_text(json.dumps(new, indent=2, ensure_ascii=False))
    return new
