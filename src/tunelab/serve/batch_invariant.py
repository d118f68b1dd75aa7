"""Batch-invariant bf16 decoding: a sequence's numbers do not depend on the rows it is batched with.

The generation engine decodes many sequences as the rows of one left-padded batch. In bf16 one rounding step is
~4e-3, so any change in the order a kernel sums in shows up, and greedy answers would differ from the same request
run alone. Two kernels change their order with the batch (measured on PyTorch 2.13's CPU kernels, oneDNN 3.12):
- attention: padding shifts where each real key falls in the vectorised reductions of SDPA. Here each row is cut
  to its real tokens and attends in an SDPA call of its own, the one it gets when it is alone in the batch (a
  lone row goes through the same function), so its output is bitwise its output alone;
- matrix products: oneDNN's bf16 matmul sums a one-row product (one token of one sequence) in another order than a
  product of two or more rows once the inner dimension is large (the MLP's down projection); each row's result is
  otherwise the same whatever the number of rows. Here a one-row product runs as two identical rows.
Norms, rotary embeddings and the rest compute each row on its own already.

`make_batch_invariant(model)` switches a transformers model (or a peft model's base) to both; the mask its
attention receives is SDPA's. One new token's query heads go through SDPA as the queries of their shared key/value
head, without copying the keys (transformers' own SDPA path copies them, or takes a slower kernel, when there is no
mask): on SmolLM2 with 16 rows, a bf16 decode step took as long as with one batched SDPA call at 400 tokens of
context, ~20% longer at 100 (the loop over rows).
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from tunelab.train.precision import bf16_supported

NAME = "tunelab_rows"


def row_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs
                  ) -> tuple[torch.Tensor, None]:
    """Causal attention of each row over its real keys. query [rows, heads, q, dim], key/value [rows, kv heads, kv,
    dim] (the queries are the last q positions of the keys), SDPA's boolean mask [rows, 1, q, kv] or None (no
    padding) -> ([rows, q, heads, dim], None); the outputs of padding queries are zeros."""
    rows, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    # a row's first real key: the one its last query sees first (left padding only)
    starts = [0] * rows if attention_mask is None else attention_mask[:, 0, -1, :].long().argmax(-1).tolist()
    out = query.new_zeros(rows, q_len, query.shape[1], value.shape[3])
    for row, start in enumerate(starts):
        first = max(0, q_len - (kv_len - start))
        out[row, first:] = _one_row(query[row, :, first:], key[row, :, start:], value[row, :, start:], scaling)
    return out, None


def _one_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """q [heads, n, dim], k/v [kv heads, m, dim] of one sequence's real tokens, the queries being the last n of the
    m -> [n, heads, dim]."""
    (heads, n, dim), (kv_heads, m, _) = q.shape, k.shape
    if n == 1:  # one new token: the query heads sharing a key/value head go as its queries, no copy of the keys
        o = sdpa(q.reshape(1, kv_heads, heads // kv_heads, dim), k[None], v[None], scale=scale)
        return o.reshape(heads, 1, dim).transpose(0, 1)
    k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
    mask = None if n == m else torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)  # after a cache
    return sdpa(q[None], k[None], v[None], attn_mask=mask, is_causal=n == m, scale=scale)[0].transpose(0, 1)


AttentionInterface.register(NAME, row_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def _linear_as_batch(layer: torch.nn.Linear):
    """`layer`'s forward with a one-row input run as two rows. On a CPU with native bf16 a bf16 weight is also
    packed once in oneDNN's blocked layout: the same numbers, but the plain bf16 matmul took ~1.5× as long per
    one-token product, enough that a one-token step was hardly faster than in fp32. The plain weight stays, for
    whatever else reads it."""
    weight, bias = layer.weight, layer.bias
    packed = None
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_supported("cpu"):
        try:  # oneDNN's private ops: a build without them keeps the plain product
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        except (AttributeError, RuntimeError):
            packed = None
    if packed is not None:
        def product(x: torch.Tensor) -> torch.Tensor:  # the packed kernel reads its input as contiguous
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    else:
        def product(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, weight, bias)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return product(x) if x.numel() != x.shape[-1] else product(torch.stack([x, x]))[0]

    return forward


def make_batch_invariant(model) -> bool:
    """Run `model`'s attention per row (`row_attention`) and its one-row linear products as two rows -> whether
    it could. Call it once the weights are final (bf16, adapters loaded): the linear layers keep a packed copy. A
    model whose attention is not plain causal SDPA (eager, flash; a sliding window, soft-capped logits) keeps its
    attention and is not batch-invariant."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if getattr(cfg, "_attn_implementation", None) == NAME:  # already
        return True
    if getattr(cfg, "_attn_implementation", None) != "sdpa" or any(
            getattr(cfg, name, None) for name in ("sliding_window", "attn_logit_softcapping", "use_alibi")):
        return False
    base.set_attn_implementation(NAME)
    for layer in model.modules():
        if type(layer) is torch.nn.Linear:
            layer.forward = _linear_as_batch(layer)
    return True
