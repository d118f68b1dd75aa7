"""`tunelab compress --int8`: a model dir's int8 twin for CPU serving in PyTorch (format: `tunelab.int8`).

Adapters are merged first (`merge.py`), then every linear layer is dynamically quantised. The result is a model
dir like any other (`tunelab predict`, `eval` and `serve` load it), with `compression: {int8: …}` and its parent
in `tunelab.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import save_file

from tunelab import __version__
from tunelab.artifacts import write_folder
from tunelab.errors import UserError
from tunelab.merge import check_mergeable, merged
from tunelab.int8 import BACKEND, WEIGHTS, int8_tensors, quantised, quantised_layers
from tunelab.model_files import files_manifest
from tunelab.models import META_FILE, load_model_dir, quiet_transformers, read_meta
from tunelab.tasks import refuse_stage


def compress_int8(model_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write the int8 twin of model dir `model_dir` into the model dir `out` -> its `tunelab.json`."""
    d = Path(model_dir)
    refuse_stage(read_meta(d).get("task"), str(d), "compress")
    model, tok, meta = load_model_dir(d)
    if (meta.get("compression") or {}).get("int8"):
        raise UserError(f"{d} is int8 already")
    method = check_mergeable(meta, d)
    plain = merged(model).eval()
    config = plain.config
    q = quantised(plain)
    layers = len(quantised_layers(q))
    if not layers:
        raise UserError(f"{d}: the model has no linear layers to quantise")
    quiet_transformers()
    with write_folder(out, "model", overwrite) as tmp:
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(int8_tensors(q), str(tmp / WEIGHTS))
        new = {**{k: v for k, v in meta.items() if k not in ("files", "created")},
               "method": {"name": "full", "merged_from": method},
               "compression": {**(meta.get("compression") or {}),
                               "int8": {"backend": BACKEND, "layers": layers, "weights": WEIGHTS}},
               "parent": {"model_dir": str(d.resolve()), "files": meta.get("files")},
               "tunelab_version": __version__, "created": int(time.time()), "files": files_manifest(tmp)}
        (tmp / META_FILE).write_text(json.dumps(new, indent=2, ensure_ascii=False))
    return new
