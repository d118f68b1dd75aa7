"""A model dir as one plain Hugging Face model: adapters merged into the base weights.

LoRA (with rsLoRA or DoRA), AdaLoRA and IA3 are linear corrections of weights the base already has, so they fold
into it (peft's `merge_and_unload`). Full, head-only and freeze fine-tunes are plain already. Prompt, prefix and
P-tuning prepend learned vectors to the input and Houlsby adapters add non-linear layers: no weight of the base
can absorb either, so they are refused with that reason.
"""

from __future__ import annotations

from tunelab.errors import UserError

MERGEABLE = ("lora", "adalora", "ia3")  # peft adapters that fold into the base weights
PLAIN = ("full", "head", "freeze")  # nothing to merge
WHY_NOT = {
    "prompt": "its virtual tokens are learned inputs prepended to every sequence, not weights",
    "prefix": "its prefixes are learned key/value vectors prepended in every layer, not weights",
    "ptuning": "its virtual tokens come from a prompt encoder prepended to every sequence, not weights",
    "adapter": "Houlsby adapters are extra non-linear layers; no weight of the base can absorb them",
}


def method_of(meta: dict) -> str:
    """The training method recorded in a model dir's `tunelab.json` ("full" when none is)."""
    return (meta.get("method") or {}).get("name") or "full"


def check_mergeable(meta: dict, model_dir, instead: str = "export a LoRA, AdaLoRA, IA3 or full fine-tune, or "
                    "serve this one with tunelab") -> str:
    """-> the method when its model can become one plain model; a `UserError` with the reason and what to do
    `instead` otherwise."""
    method = method_of(meta)
    if method in MERGEABLE or method in PLAIN:
        return method
    why = WHY_NOT.get(method, "tunelab does not know how to merge it")
    raise UserError(f"{model_dir} was trained with {method}, which cannot be merged into a plain model: {why}; "
                    f"{instead}")


def merged(model):
    """The model with its peft adapters folded into the base weights (in place) -> a plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
