"""Houlsby bottleneck adapters (Houlsby et al., 2019), which `peft` does not have.

A bottleneck (down-projection d -> b, GELU, up-projection b -> d, added residually) follows the output
projection of every attention block and every feed-forward block. The up-projection starts near zero,
so a fresh adapter is (almost) the identity and training starts from the base model's behaviour. The
base weights are frozen; only adapters (and a task head, if any) train.

Saved in the adapter-folder convention next to peft's: `houlsby_config.json` + `adapter_model.safetensors`
(the trainable tensors: adapters and head). Houlsby adapters are non-linear, so they cannot be merged
into the base weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "houlsby_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Output projections of attention and feed-forward blocks: Llama/Mistral/Qwen/Gemma, BERT/RoBERTa, GPT-NeoX.
DEFAULT_TARGETS = [r"self_attn\.o_proj$", r"mlp\.down_proj$", r"attention\.output\.dense$",
                   r"layer\.\d+\.output\.dense$", r"attention\.dense$", r"mlp\.dense_4h_to_h$"]


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.0, init_scale: float = 1e-3):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.normal_(self.up.weight, std=init_scale)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` plus the bottleneck's output (same shape): the residual keeps a fresh adapter, whose up-projection
        is near zero, close to the identity."""
        return x + self.up(self.dropout(nn.functional.gelu(self.down(x))))


class AdaptedLinear(nn.Module):
    """A frozen linear layer followed by a bottleneck adapter."""

    def __init__(self, base: nn.Linear, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (the tensor itself), so that code inspecting the wrapped layer's dtype or
        device still works."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output, passed through the adapter."""
        return self.adapter(self.base(x))


def target_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Qualified names of the `nn.Linear` modules of `model` that any of the regexes `patterns` matches
    (`re.search`), in `named_modules` order; [] when none does."""
    regs = [re.compile(p) for p in patterns]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(r.search(n) for r in regs)]


def add_adapters(model: nn.Module, bottleneck: int, dropout: float = 0.0, init_scale: float = 1e-3,
                 patterns: list[str] | None = None, trainable_extra: list[str] = ()) -> nn.Module:
    """Insert adapters in place; freeze everything except adapters and modules named in `trainable_extra`.

    Raises ValueError when no target layer is found (an architecture the default patterns miss)."""
    names = target_names(model, patterns or DEFAULT_TARGETS)
    if not names:
        raise ValueError("no attention/feed-forward output projections found for adapters in this architecture")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        ad = Bottleneck(base.out_features, bottleneck, dropout, init_scale).to(base.weight.device)
        setattr(parent, child, AdaptedLinear(base, ad))
    for name, p in model.named_parameters():
        # ".adapter.": the parameters of every AdaptedLinear's `adapter`
        if ".adapter." in name or any(name == h or name.startswith(h + ".") for h in trainable_extra):
            p.requires_grad_(True)
    # what `save_adapters` writes to the config, so that `load_adapters` can rebuild the same adapters
    model.tunelab_adapter = {"bottleneck": bottleneck, "dropout": dropout, "init_scale": init_scale,
                             "patterns": patterns or DEFAULT_TARGETS, "trainable_extra": list(trainable_extra)}
    return model


def save_adapters(model: nn.Module, out: Path) -> None:
    """Write the trainable tensors (adapters and any trainable head) to `out/adapter_model.safetensors` and the
    settings to `out/houlsby_config.json`. `model` must have been through `add_adapters`; `out` must exist."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"adapter_type": "houlsby", **model.tunelab_adapter}, indent=2))


def load_adapters(model: nn.Module, d: Path) -> nn.Module:
    """Rebuild the adapters described in `d` on a fresh base and load their weights (strictly)."""
    cfg = json.loads((d / CONFIG_FILE).read_text())
    add_adapters(model, cfg["bottleneck"], cfg["dropout"], cfg["init_scale"], cfg["patterns"],
                 cfg["trainable_extra"])
    weights = load_file(str(d / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise ValueError(f"adapter weights do not match the model (missing {missing[:3]}, unknown {unknown[:3]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    return model
