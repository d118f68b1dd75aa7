"""Training methods: what trains and what stays frozen. `apply_method(model, method_cfg, ctx)`.

`full` trains everything; `head` only the task head; `freeze` the last k transformer layers + head;
`lora` (rsLoRA, DoRA), `adalora`, `prefix`, `prompt`, `ptuning`, `ia3` via peft; `adapter`: Houlsby
bottleneck adapters (tunelab.methods.adapter). Adapter methods never change the base weights.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from torch import nn

from tunelab.errors import UserError
from tunelab.tasks import TaskSpec, task_spec

PEFT_METHODS = ("lora", "adalora", "prefix", "prompt", "ptuning", "ia3")


@dataclass
class MethodContext:
    task: TaskSpec  # what is trained (a task name is looked up in the registry)
    new_params: list[str]  # names of freshly initialised parameters (the task head)
    total_steps: int = 1000  # AdaLoRA's budget schedule needs the run length
    tokenizer_path: str | None = None  # prompt tuning initialised from text loads the tokenizer from here

    def __post_init__(self) -> None:
        if isinstance(self.task, str):
            self.task = task_spec(self.task)


def head_module_names(model: nn.Module, new_params: list[str]) -> list[str]:
    """Top-level modules outside the pretrained body, plus modules with newly initialised weights."""
    body = getattr(model, "base_model_prefix", "")
    names = {n for n, m in model.named_children() if n != body and any(True for _ in m.parameters())}
    if body and not hasattr(model, body):  # a bare body (AutoModel, a sentence encoder): its children are the body
        names = set()
    names |= {p.rsplit(".", 1)[0] for p in new_params}
    return sorted(names)


def _heads(model, ctx: MethodContext) -> list[str]:
    """Task heads that must train with any method. A causal LM's output layer is the pretrained
    (often embedding-tied) vocabulary projection, not a new head."""
    if ctx.task.generates:
        return []
    return head_module_names(model, ctx.new_params)


def _set_trainable(model: nn.Module, keep) -> nn.Module:
    for name, p in model.named_parameters():
        p.requires_grad_(bool(keep(name)))
    return model


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in prefixes)


def _apply_full(model, method, ctx):
    return _set_trainable(model, lambda name: True)


def _apply_head(model, method, ctx):
    heads = head_module_names(model, ctx.new_params)
    return _set_trainable(model, lambda name: _under(name, heads))


_LAYER = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def _apply_freeze(model, method, ctx):
    """Train the last `method.freeze.trainable_layers` transformer layers, the final norm and the task head."""
    indices = {int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER.search(n))}
    if not indices:
        raise UserError("method freeze: no numbered transformer layers found in this model")
    first = max(indices) + 1 - method.freeze.trainable_layers
    heads = _heads(model, ctx)

    def keep(name: str) -> bool:
        m = _LAYER.search(name)
        if m:
            return int(m.group(1)) >= first
        return _under(name, heads) or (method.freeze.trainable_layers > 0 and re.search(r"(^|\.)(norm|final_layer_norm|"
                                                                                  r"ln_f)\.", name) is not None)

    return _set_trainable(model, keep)


def _untied(model: nn.Module, heads: list[str]) -> list[str]:
    """The head modules peft may copy (`modules_to_save`): a module holding a weight shared with the body (an MLM
    head's decoder is the word embeddings) is replaced by its children that hold none, so the embeddings are
    neither copied nor trained; parameters directly on such a module (an MLM's output bias) stay as loaded. A
    module inside another kept one is dropped (the outer copy holds it)."""
    owners: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}

    def untied(prefix: str, module: nn.Module) -> list[str]:
        if not any(n == prefix or n.startswith(prefix + ".") for n in shared):
            return [prefix] if any(True for _ in module.parameters()) else []
        return [m for child, sub in module.named_children() for m in untied(f"{prefix}.{child}", sub)]

    modules = dict(model.named_modules())
    kept = {m for h in heads if h in modules for m in untied(h, modules[h])}
    return sorted(m for m in kept if not any(m.startswith(k + ".") for k in kept))


def _peft_config(method, ctx: MethodContext, model):
    import peft  # ~2 s even after transformers; full, head, freeze and adapter training never load it

    task_type = getattr(peft.TaskType, ctx.task.peft_task_type)
    heads = _untied(model, _heads(model, ctx)) or None
    name = method.name
    if name == "lora":
        c = method.lora
        return peft.LoraConfig(task_type=task_type, r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                               target_modules=c.target_modules, use_rslora=c.rslora, use_dora=c.dora,
                               modules_to_save=heads)
    if name == "adalora":
        c = method.adalora
        tinit = round(c.tinit * ctx.total_steps)
        tfinal = round(c.tfinal * ctx.total_steps)
        if ctx.total_steps - tinit - tfinal <= 0:
            raise UserError("method.adalora: tinit + tfinal leave no steps for the budget schedule; "
                            "lower them or train longer")
        return peft.AdaLoraConfig(task_type=task_type, init_r=c.init_r, target_r=c.target_r, lora_alpha=c.alpha,
                                  lora_dropout=c.dropout, target_modules=c.target_modules, tinit=tinit,
                                  tfinal=tfinal, deltaT=c.delta_t, total_step=ctx.total_steps,
                                  modules_to_save=heads)
    if name == "ia3":
        kwargs = {}
        if method.ia3.target_modules is not None:
            kwargs = {"target_modules": method.ia3.target_modules, "feedforward_modules": []}
        return peft.IA3Config(task_type=task_type, modules_to_save=heads, **kwargs)
    c = method.prompt
    if name == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=c.virtual_tokens)
    if name == "prompt":
        init = ({"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": c.init_text,
                 "tokenizer_name_or_path": ctx.tokenizer_path} if c.init_text else {})
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=c.virtual_tokens, **init)
    return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=c.virtual_tokens,
                                    encoder_hidden_size=c.encoder_hidden_size)


def _apply_peft(model, method, ctx):
    from peft import get_peft_model  # peft again: paid only by the peft methods

    if method.name == "prefix" and ctx.task.labelled:
        # peft's own test for these heads, made at load instead of at the first forward
        body = getattr(model, getattr(model, "base_model_prefix", ""), model)
        if not any("past_key_values" in inspect.signature(m.forward).parameters for m in (model, body)):
            raise UserError(f"method prefix needs a model that takes past key values; {type(body).__name__} "
                            "does not (transformers 5 encoders); use prompt or ptuning")

    cfg = _peft_config(method, ctx, model)
    try:
        return get_peft_model(model, cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"method {method.name}: {err}") from None


def _apply_adapter(model, method, ctx):
    from tunelab.methods.adapter import add_adapters  # brings safetensors; only the adapter method needs it

    c = method.adapter
    try:
        return add_adapters(model, c.bottleneck, c.dropout, c.init_scale, trainable_extra=_heads(model, ctx))
    except ValueError as err:
        raise UserError(f"method adapter: {err}") from None


METHODS = {"full": _apply_full, "head": _apply_head, "freeze": _apply_freeze, "adapter": _apply_adapter,
           **{name: _apply_peft for name in PEFT_METHODS}}


def apply_method(model: nn.Module, method, ctx: MethodContext) -> nn.Module:
    """Return the model to train (possibly a peft wrapper) with `requires_grad` set per the method."""
    if method.name == "prompt" and method.prompt.init_text and (
            not ctx.task.generates or ctx.tokenizer_path is None):
        raise UserError("method.prompt.init_text works for causal_lm/sft on a pretrained base only")
    return METHODS[method.name](model, method, ctx)


def is_adapter_method(name: str) -> bool:
    """Methods that leave the base weights untouched and save only the added tensors."""
    return name in PEFT_METHODS or name == "adapter"
