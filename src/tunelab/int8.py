"""The int8 model format: linear layers dynamically quantised (`torch.ao`), saved as plain tensors.

Every `nn.Linear` of a model gets int8 weights with one symmetric scale per output row, and its input is
quantised to int8 per call (PyTorch's dynamic quantisation on the FBGEMM / oneDNN kernels); embeddings, norms and
buffers stay float32. On disk (`WEIGHTS`, safetensors, never a pickle): for each quantised layer
`<name>.weight_int8`, `<name>.weight_scale`, `<name>.weight_zero_point` and its float `<name>.bias`; every other
weight as it was. Loading builds the float model from `config.json`, quantises it the same way and puts the saved
integers back, so the reloaded model computes exactly what was saved. `export/quantize.py` writes such model
dirs; `models.load_model_dir` reads them (their `tunelab.json` says `compression: {int8: …}`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

from tunelab.errors import UserError

WEIGHTS = "model.int8.safetensors"
BACKEND = "torch.ao dynamic quantisation, qint8 weights per output channel"
FIELDS = ("weight_int8", "weight_scale", "weight_zero_point", "bias")


def quantised(model: nn.Module) -> nn.Module:
    """`model` with every nn.Linear replaced by its dynamically quantised twin (weights per output channel)."""
    with warnings.catch_warnings():  # its deprecation notice points at torchao (see `export/quantize.py`)
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def quantised_layers(model: nn.Module) -> dict[str, DynamicLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def int8_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """A `quantised` model as the plain tensors of `WEIGHTS` (each with its own memory, as safetensors wants)."""
    layers = quantised_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        w, bias = layer.weight(), layer.bias()
        tensors[f"{name}.weight_int8"] = w.int_repr()
        tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
        tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float()
    inside = tuple(f"{n}." for n in layers)
    for name, t in model.state_dict().items():  # embeddings, norms, buffers: as they were
        if isinstance(t, torch.Tensor) and not t.is_quantized and not name.startswith(inside):
            tensors[name] = t.detach()
    return {name: t.clone().contiguous() for name, t in tensors.items()}


def load_int8(d: Path, loader) -> nn.Module:
    """The int8 model of model dir `d`: the float model from its `config.json` through `loader` (an Auto class),
    quantised, with the saved integers, scales and float weights put back."""
    from safetensors.torch import load_file  # the weights format, loaded with the model
    from transformers import AutoConfig  # as above

    model = quantised(loader.from_config(AutoConfig.from_pretrained(d)).eval())
    saved = load_file(str(d / WEIGHTS))
    layers = quantised_layers(model)
    for name, layer in layers.items():
        try:
            ints, scale, zero = (saved.pop(f"{name}.{k}") for k in FIELDS[:3])
        except KeyError:
            raise UserError(f"{d / WEIGHTS} lacks the int8 weights of layer {name}; compress the model again") \
                from None
        weight = torch._make_per_channel_quantized_tensor(ints, scale.double(), zero, 0)
        layer.set_weight_bias(weight, saved.pop(f"{name}.bias", None))
    # the float rest, one tensor at a time (load_state_dict would ask the quantised layers for their own keys)
    inside = tuple(f"{n}." for n in layers)
    expected = [k for k in model.state_dict() if not k.startswith(inside)]
    targets = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in targets]
    with torch.no_grad():
        for name, value in saved.items():
            if name in targets:
                targets[name].copy_(value)
    if missing or unexpected:
        raise UserError(f"{d / WEIGHTS} does not fit its config.json (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); compress the model again")
    return model.eval()
