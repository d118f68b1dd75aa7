"""Batch-invariant decoding (`serve.batch_invariant`): attention per row is attention (padded prompts, one new token
after a cache, a chunk after a cache), and a one-row linear product is the layer's product."""

from __future__ import annotations

import pytest
import torch

from tunelab.serve.batch_invariant import NAME, _linear_as_batch, make_batch_invariant


@pytest.fixture(scope="module")
def pair(peaky_llama):
    """peaky-llama twice in fp32: with SDPA, and batch-invariant."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(peaky_llama, dtype=torch.float32).eval()
    rows = AutoModelForCausalLM.from_pretrained(peaky_llama, dtype=torch.float32).eval()
    assert make_batch_invariant(rows) and rows.config._attn_implementation == NAME
    assert make_batch_invariant(rows)  # twice is once
    return plain, rows


def _left_padded(prompts: list[list[int]]):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@torch.inference_mode()
def test_row_attention_computes_attention(pair):
    from transformers import DynamicCache

    prompts = [[5, 17, 300, 42, 8, 9, 1000], [77, 3], [400, 401, 402, 403]]
    ids, mask, positions = _left_padded(prompts)
    outs = []
    for model in pair:
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache).logits
        step_mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], 1)
        step = model(input_ids=torch.tensor([[11], [12], [13]]), attention_mask=step_mask, cache=cache,
                     position_ids=torch.tensor([[len(p)] for p in prompts])).logits
        chunked = DynamicCache(config=model.config)  # one prompt in two chunks through its own cache
        model(input_ids=torch.tensor([prompts[0][:3]]), cache=chunked)
        tail = model(input_ids=torch.tensor([prompts[0][3:]]), cache=chunked,
                     position_ids=torch.arange(3, len(prompts[0]))[None]).logits
        real = torch.cat([first[i, mask[i].bool()] for i in range(len(prompts))])  # padding positions: unused
        outs.append((real, step, tail))
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][2][0], outs[1][0][3:len(prompts[0])], atol=1e-4, rtol=1e-4)  # chunk == whole


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_row_product_is_the_layers_product(dtype):
    layer = torch.nn.Linear(1536, 64, bias=True).to(dtype)
    x = torch.randn(1, 1, 1536, dtype=dtype)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    layer.forward = _linear_as_batch(layer)
    got = layer(x)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.02)  # bf16: another summation order, one rounding
    many = torch.randn(3, 5, 3072, dtype=dtype)[..., ::2]  # not contiguous in memory
    assert not many.is_contiguous()
    torch.testing.assert_close(layer(many), torch.nn.functional.linear(many, layer.weight, layer.bias),
                               atol=0.05, rtol=0.02)
