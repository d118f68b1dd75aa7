"""The precision a served generator decodes in, and how far bf16 moves it from fp32.

`decoding_precision` casts a generator to bf16 where `precision` resolves to it (auto: where the hardware computes
bf16 natively, `train.precision.resolve_precision`), else leaves it in fp32. The engine then decodes batch-invariantly
(`serve.batch_invariant`) and reads the logits in fp32. `bf16_agreement` measures the cost, teacher-forced, on real
sentences: what matters on a real model, where a tiny random one would only measure noise.
"""

from __future__ import annotations

import copy

import torch

from tunelab.train.precision import resolve_precision


def decoding_precision(model: torch.nn.Module, precision: str, device: str) -> str:
    """Cast a generator's weights to the dtype it decodes in -> "bf16" or "fp32". `precision`: auto | fp32 | bf16
    (auto: bf16 only where the hardware computes it natively; bf16 is honoured as asked). An int8 model (linear
    layers quantised by torch.ao, which take fp32 inputs) stays fp32. Call it once the adapters are loaded: they
    are cast with the rest."""
    quantised = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    if quantised or resolve_precision(precision, device) != "bf16":
        return "fp32"
    to_bf16(model)
    return "bf16"


def to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast `model` to bf16 in place, but for its rotary embeddings' frequencies (`inv_freq` buffers): rounded to
    bf16 they would turn positions by up to radians at a few thousand tokens; transformers reads them in fp32."""
    keep = {name: b.detach().clone() for name, b in model.named_buffers()
            if name.rsplit(".", 1)[-1].endswith("inv_freq")}
    model.to(torch.bfloat16)
    for name, b in keep.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, b, persistent=False)
    return model


# Real sentences (prompt, continuation), English and Chinese, on which `bf16_agreement` scores a model.
AGREEMENT_TEXTS = [
    ("The capital of France is", " Paris, which is also the largest city in the country."),
    ("Water boils at 100 degrees Celsius at sea level, but", " on a high mountain it boils at a lower temperature "
     "because the air pressure is lower."),
    ("Photosynthesis is the process by which plants", " use sunlight, water and carbon dioxide to make sugar and "
     "release oxygen."),
    ("To make a cup of tea, first boil the water, then", " pour it over the leaves and let them steep for three to "
     "five minutes."),
    ("The Great Wall of China was built over many centuries", " to protect the northern borders of the empire from "
     "raids."),
    ("中国的首都是", "北京，它是一座有三千多年历史的城市。"),
    ("今天天气很好，", "我们一起去公园散步吧，顺便买一点水果。"),
    ("学习一门新的语言需要", "时间和耐心，每天练习一点会很有帮助。"),
]


@torch.inference_mode()
def bf16_agreement(model: torch.nn.Module, tokenizer, texts: list[tuple[str, str]] = AGREEMENT_TEXTS) -> dict:
    """How far bf16 decoding moves `model` (fp32, left as it is) from fp32, teacher-forced: each (prompt,
    continuation) is run whole, one sequence per forward, by the model and by a bf16 copy of it that computes as
    the engine does (`make_batch_invariant`); at every continuation token its log-probability (softmax in fp32 on
    both sides) and the most likely token there are compared. -> {"positions", "top1_agreement" (share of
    positions with the same most likely token), "max_abs_dlogprob", "mean_abs_dlogprob" (|Δ| of the
    continuation token's log-probability)}."""
    from tunelab.serve.batch_invariant import make_batch_invariant  # imports transformers: with the model

    low = to_bf16(copy.deepcopy(model))
    make_batch_invariant(low)
    same, deltas = [], []
    for prompt, continuation in texts:
        head = tokenizer(prompt)["input_ids"]
        tail = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tail], device=model.device)
        at = slice(len(head) - 1, len(head) + len(tail) - 1)  # the positions that predict the continuation
        full, half = (torch.log_softmax(m(input_ids=ids).logits[0, at].float(), -1) for m in (model, low))
        target = torch.tensor(tail, device=model.device)[:, None]
        deltas += (full.gather(1, target) - half.gather(1, target))[:, 0].abs().tolist()
        same += (full.argmax(-1) == half.argmax(-1)).tolist()
    return {"positions": len(deltas), "top1_agreement": sum(same) / len(same),
            "max_abs_dlogprob": max(deltas), "mean_abs_dlogprob": sum(deltas) / len(deltas)}
