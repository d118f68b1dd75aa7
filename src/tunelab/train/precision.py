"""Mixed precision: bf16 autocast where the hardware computes bf16 natively, fp32 otherwise.

Weights, gradients and optimizer state stay fp32; only the matmuls inside the forward pass run in
bf16 (the loss is computed in fp32). On CPUs without native bf16 (no AVX512-BF16 / AMX) bf16 is
emulated and slower than fp32, so `auto` picks fp32 there.
"""

from __future__ import annotations

import contextlib

import torch


def bf16_supported(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> `bf16` if supported natively else `fp32`; an explicit `bf16` is honoured as asked."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()
