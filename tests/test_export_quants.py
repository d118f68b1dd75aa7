"""The GGUF quantiser with searched block scales: ggml's layout, never worse than the reference, better where the
inputs are large."""

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from tunelab.errors import UserError
from tunelab.export.quants import Q4_0, Q8_0, importance, quantize


def _matrix(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((48, 128)).astype(np.float32)
    a[3] = 0  # an all-zero row
    a[5, :32] = 0  # and an all-zero block
    a[7, 40] = 25.0  # one outlier dominating its block
    return a


def _dequantised(packed: np.ndarray, kind, shape) -> np.ndarray:
    return gguf.quants.dequantize(packed, kind).reshape(shape)


@pytest.mark.parametrize("kind", [Q8_0, Q4_0])
def test_blocks_are_ggml_layout_and_never_worse_than_the_reference(kind):
    a = _matrix()
    ours, ref = quantize(a, kind), gguf.quants.quantize(a, kind)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    got, want = _dequantised(ours, kind, a.shape), _dequantised(ref, kind, a.shape)
    err = ((got - a) ** 2).reshape(-1, 32).sum(1)
    ref_err = ((want - a) ** 2).reshape(-1, 32).sum(1)
    assert np.all(err <= ref_err * (1 + 1e-6) + 1e-12)  # the reference's scale is always a candidate
    some = ref_err > 0
    assert np.mean(err[some] / ref_err[some]) < 0.95  # and the search finds better ones (Q8_0 ~0.8, Q4_0 ~0.89)
    assert np.all(got[3] == 0) and np.all(got[5, :32] == 0)
    lo, hi = (-127, 127) if kind == Q8_0 else (-8, 7)
    scales = ours.reshape(-1, ours.shape[1] // (a.shape[1] // 32))[:, :2].copy().view("<f2").astype(np.float32)
    levels = got.reshape(-1, 32) / np.where(scales == 0, 1, scales)
    assert np.allclose(levels, np.round(levels), atol=1e-3) and levels.min() >= lo and levels.max() <= hi


def test_weights_put_the_error_where_the_inputs_are_small():
    a = _matrix(1)
    rng = np.random.default_rng(2)
    col_scale = np.exp(rng.uniform(-3, 3, a.shape[1])).astype(np.float32)  # inputs 400x apart in size
    x = rng.standard_normal((512, a.shape[1])).astype(np.float32) * col_scale
    weights = (x * x).mean(0)

    def output_error(packed):
        return float(((x @ (_dequantised(packed, Q8_0, a.shape) - a).T) ** 2).mean())

    plain, weighted = output_error(quantize(a, Q8_0)), output_error(quantize(a, Q8_0, weights))
    assert weighted < 0.7 * plain
    assert weighted < 0.7 * output_error(gguf.quants.quantize(a, Q8_0))


def test_rows_that_do_not_split_into_blocks_and_other_types_are_refused():
    with pytest.raises(UserError, match="32-value blocks"):
        quantize(np.zeros((2, 40), np.float32), Q8_0)
    with pytest.raises(UserError, match="Q8_0 and Q4_0"):
        quantize(np.zeros((2, 32), np.float32), gguf.GGMLQuantizationType.Q5_0)


def test_importance_is_the_mean_square_of_each_linear_input():
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        config = SimpleNamespace(tie_word_embeddings=False)

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.proj = torch.nn.Linear(4, 3)

        def forward(self, input_ids):
            return self.proj(self.embed(input_ids))

    model = Toy()
    texts = {"a b": [1, 2], "c": [3]}

    def tok(text, **kwargs):
        return {"input_ids": torch.tensor([texts[text]])}

    got = importance(model, tok, list(texts), max_length=8)
    with torch.no_grad():
        rows = model.embed(torch.tensor([1, 2, 3]))
    assert set(got) == {"proj.weight"}
    np.testing.assert_allclose(got["proj.weight"], (rows ** 2).mean(0).numpy(), rtol=1e-5)
