"""The GGUF quantiser: searched block scales in ggml's layout, never worse than the reference and better where the
inputs are large; GPTQ levels that cut the output error further under the same scales; calibration second moments
collected a group of layers at a time."""

from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

from tunelab.errors import UserError
from tunelab.export.quants import Q4_0, Q8_0, Calibration, quantize


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
    hessian = (x.T.astype(np.float64) @ x) / len(x)

    def output_error(packed):
        return float(((x @ (_dequantised(packed, Q8_0, a.shape) - a).T) ** 2).mean())

    plain = output_error(quantize(a, Q8_0))
    weighted = output_error(quantize(a, Q8_0, hessian, compensate=False))
    assert weighted < 0.7 * plain
    assert weighted < 0.7 * output_error(gguf.quants.quantize(a, Q8_0))


@pytest.mark.parametrize("kind", [Q8_0, Q4_0])
def test_gptq_levels_keep_the_scales_and_cut_the_output_error_on_correlated_inputs(kind):
    a = _matrix(3)
    rng = np.random.default_rng(4)
    # inputs near a 16-dimensional subspace, as a transformer's activations mostly are
    x = rng.standard_normal((2048, 16)) @ rng.standard_normal((16, a.shape[1]))
    x = (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    hessian = (x.T.astype(np.float64) @ x) / len(x)

    def output_error(packed):
        return float(((x @ (_dequantised(packed, kind, a.shape) - a).T) ** 2).mean())

    searched, gptq = quantize(a, kind, hessian, compensate=False), quantize(a, kind, hessian)
    scales = [p.reshape(-1, p.shape[1] // (a.shape[1] // 32))[:, :2] for p in (searched, gptq)]
    assert np.array_equal(*scales)  # the same blocks' scales: only the levels move
    assert output_error(gptq) < 0.3 * output_error(searched)  # 0.03-0.08 over seeds 3-7, both types
    got = _dequantised(gptq, kind, a.shape)
    assert np.all(got[3] == 0) and np.all(got[5, :32] == 0)  # a zero scale holds zeros whatever is compensated


def test_a_singular_second_moment_falls_back_to_the_searched_levels():
    a = _matrix(5)
    hessian = np.full((a.shape[1], a.shape[1]), np.nan)
    assert np.array_equal(quantize(a, Q8_0, hessian), quantize(a, Q8_0, hessian, compensate=False))


def test_rows_that_do_not_split_into_blocks_and_other_types_are_refused():
    with pytest.raises(UserError, match="32-value blocks"):
        quantize(np.zeros((2, 40), np.float32), Q8_0)
    with pytest.raises(UserError, match="Q8_0 and Q4_0"):
        quantize(np.zeros((2, 32), np.float32), gguf.GGMLQuantizationType.Q5_0)


def test_calibration_collects_each_linear_inputs_second_moment_a_group_at_a_time():
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        config = SimpleNamespace(tie_word_embeddings=False)

        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.first = torch.nn.Linear(4, 6)
            self.second = torch.nn.Linear(6, 3)

        def forward(self, input_ids):
            return self.second(self.first(self.embed(input_ids)))

    model = Toy()
    texts = {"a b": [1, 2], "c": [3]}
    passes = []

    def tok(text, **kwargs):
        passes.append(text)
        return {"input_ids": torch.tensor([texts[text]])}

    fitted = Calibration(model, tok, [*texts, *texts], max_length=8, budget=8 * 6 * 6)  # one matrix a pass
    with torch.no_grad():
        x = model.embed(torch.tensor([1, 2, 3])).double()
        y = model.first(x.float()).double()
    np.testing.assert_allclose(fitted.hessian("first.weight"), (x.T @ x / 3).numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fitted.hessian("second.weight"), (y.T @ y / 3).numpy(), rtol=1e-5, atol=1e-7)
    assert len(passes) == 2 * len(texts)  # one pass over the distinct texts per group
    assert fitted.hessian("embed.weight") is None
    assert not fitted.compensable("first.weight")  # 3 tokens for 4 inputs: too few to compensate against
