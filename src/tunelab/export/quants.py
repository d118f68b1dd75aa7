"""Q8_0 and Q4_0 blocks fitted to the inputs the model sees.

Both formats store a matrix row as blocks of 32 values: one float16 scale `d` and 32 small integers `q`
(Q8_0: -127..127 in a byte each; Q4_0: -8..7 in a nibble each), read back as `q * d`. The `gguf` package's
numpy quantisers, like llama.cpp's reference ones, take `d` from each block's largest value and round each value
to its nearest level. Here, given calibration text:

1. each block's scale is searched: among candidates around the reference one (which is always among them), the
   one whose rounding error, weighted per column by the mean square of the matrix's input, is smallest
   (llama.cpp's "importance matrix" idea: an error on a column that carries large activations moves the output
   most);
2. then the levels are chosen by GPTQ (Frantar et al. 2022) with those scales fixed: the columns are rounded one
   at a time, those with the largest inputs first, and each rounding error is compensated on the columns not yet
   rounded through the inverse of the input's second-moment matrix X^T X / n, so that the layer's output over the
   calibration inputs, not each weight, stays closest to the float one.

GPTQ needs the input's second moments known in every direction: with fewer than 8 calibration tokens per input
column (no dataset: only the built-in sentences) the levels stay the searched scales' rounding.

The file format is unchanged: every GGUF reader reads these blocks. The token-embedding table is a lookup as well
as (when tied) the output layer, so it gets the searched scales only; compensation is for what only multiplies.

On SmolLM2-135M over tweets, Q8_0 with searched scales has a seventh of the reference quantiser's mean KL divergence
from the float model, and GPTQ halves it again (`benchmarks/export.py`).
"""

from __future__ import annotations

import contextlib

import gguf
import numpy as np
import torch

from tunelab.errors import UserError

BLOCK = 32
Q8_0, Q4_0 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
# levels, and the divisors t of the block's largest |value| tried as scales (d = ±amax / t); the first is the
# reference quantiser's choice
LEVELS = {Q8_0: (-127, 127), Q4_0: (-8, 7)}
DIVISORS = {Q8_0: np.concatenate([[127.0], np.arange(129.0, 78.0, -0.5)]),
            Q4_0: np.concatenate([[-8.0], np.arange(-9.0, -3.9, 0.125), np.arange(4.0, 7.6, 0.125)])}
CHUNK = 1 << 15  # blocks searched at once (bounds the working memory to a few tens of MB)
BUDGET = 1 << 30  # bytes of X^T X matrices collected in one pass over the calibration text
DAMP = 0.01  # added to X^T X's diagonal, times its mean: keeps the inverse stable where inputs are collinear
STEP = 128  # columns rounded between two lazy updates of the rest of the matrix
# GPTQ's compensation needs X^T X to be known in every direction: at least this many calibration tokens per input
# column, else the errors are pushed where calibration never looked (8 built-in sentences, 132 tokens, against
# 576 columns made SmolLM2's chat answers worse than plain rounding); below it, the searched scales only
TOKENS_PER_INPUT = 8


class Calibration:
    """X^T X / n of the input of each linear layer over calibration text, collected on demand a group of layers
    at a time (one forward pass over the text per group, each group's matrices within `budget` bytes), so that a
    large model's matrices are never all held at once. Ask in the model's order."""

    def __init__(self, model, tok, texts: list[str], max_length: int, budget: int = BUDGET):
        # a repeated text adds nothing to X^T X / n but would count as new tokens (the built-in sentences are
        # repeated to fill the rows asked for)
        texts = list(dict.fromkeys(texts))
        self.model, self.tok, self.texts, self.max_length, self.budget = model, tok, texts, max_length, budget
        self.linears = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        # a tied input embedding is the output layer's matrix: it shares that layer's inputs
        self.alias = {"model.embed_tokens.weight": "lm_head.weight"} if tied and "lm_head.weight" in self.linears \
            else {}
        self.held: dict[str, tuple[np.ndarray, int]] = {}

    def hessian(self, name: str) -> np.ndarray | None:
        """[in, in] float64 for the weight `name`; None for a matrix that is no linear layer's."""
        held = self._held(name)
        return None if held is None else held[0]

    def compensable(self, name: str) -> bool:
        """Whether enough calibration tokens reached the matrix `name` for GPTQ (see TOKENS_PER_INPUT)."""
        held = self._held(name)
        return held is not None and held[1] >= TOKENS_PER_INPUT * held[0].shape[0]

    def _held(self, name: str) -> tuple[np.ndarray, int] | None:
        name = self.alias.get(name, name)
        if name not in self.linears:
            return None
        if name not in self.held:
            names = list(self.linears)
            group, size = [], 0
            for n in names[names.index(name):]:
                size += 8 * self.linears[n].in_features ** 2
                if group and size > self.budget:
                    break
                group.append(n)
            self.held = {}  # the previous group is done with
            self.held = second_moments(self.model, self.tok, self.texts, self.max_length,
                                       {n: self.linears[n] for n in group})
        return self.held[name]


@torch.inference_mode()
def second_moments(model, tok, texts: list[str], max_length: int, linears: dict
                   ) -> dict[str, tuple[np.ndarray, int]]:
    """(X^T X / n, n) over `texts` of the input X (n rows) of each module in `linears` ({weight name: nn.Linear})."""
    sums: dict[str, list] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            total = sums.setdefault(name, [0.0, 0])
            total[0] = total[0] + x.T @ x
            total[1] += x.shape[0]
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for text in texts:
            ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1]:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in linears.items():
        total, n = sums.get(name, (None, 0))
        out[name] = ((total / n).numpy() if n else np.zeros((m.in_features, m.in_features)), n)
    return out


def quantize(data: np.ndarray, kind, hessian: np.ndarray | None = None, compensate: bool = True) -> np.ndarray:
    """A 2-D float matrix as `kind` blocks (rows of uint8, the layout `gguf.quants.quantize` returns). Each block's
    scale is the candidate with the least squared error weighted by the diagonal of `hessian` (X^T X / n of the
    matrix's input; None: unweighted); with `hessian` and `compensate`, the levels are then GPTQ's."""
    if kind not in LEVELS:
        raise UserError(f"searched scales are for Q8_0 and Q4_0, not {kind.name}")
    rows, cols = data.shape
    if cols % BLOCK:
        raise UserError(f"a row of {cols} values does not split into {BLOCK}-value blocks")
    blocks = data.astype(np.float32).reshape(-1, BLOCK)
    w = np.ones(cols, np.float32) if hessian is None else np.maximum(np.diag(hessian).astype(np.float32), 1e-12)
    w = w.reshape(-1, BLOCK)  # the weights of the blocks of one row; every row repeats them
    scales = np.empty(len(blocks), np.float16)
    levels = np.empty(blocks.shape, np.int8)
    per_row = cols // BLOCK
    for start in range(0, len(blocks), CHUNK):
        b = blocks[start:start + CHUNK]
        bw = w[np.arange(start, start + len(b)) % per_row]
        scales[start:start + len(b)], levels[start:start + len(b)] = _search(b, bw, kind)
    if hessian is not None and compensate:
        levels = _compensated(data, hessian, scales, kind)
    return _pack(scales, levels, kind).reshape(rows, -1)


def _search(b: np.ndarray, w: np.ndarray, kind) -> tuple[np.ndarray, np.ndarray]:
    """The best (float16 scale, levels) of each block in `b` among the candidate divisors. The candidates' errors
    are computed in one reused buffer (no array per candidate), the best scale kept, its levels rounded once."""
    lo, hi = LEVELS[kind]
    amax = np.abs(b).max(1, keepdims=True)
    if kind == Q4_0:  # the reference scales by the signed value of largest magnitude
        amax = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
    best_d = best_err = None
    buf = np.empty_like(b)
    for t in DIVISORS[kind]:
        d = (amax / t).astype(np.float16)
        d32 = d.astype(np.float32)
        np.divide(b, np.where(d32 == 0, 1.0, d32), out=buf)
        np.round(buf, out=buf)
        np.clip(buf, lo, hi, out=buf)
        buf[(d32 == 0)[:, 0]] = 0
        buf *= d32
        buf -= b
        np.square(buf, out=buf)
        buf *= w
        err = buf.sum(1)
        if best_err is None:
            best_d, best_err = d, err
            continue
        better = err < best_err
        best_d = np.where(better[:, None], d, best_d)
        best_err = np.minimum(err, best_err)
    d32 = best_d.astype(np.float32)
    q = np.clip(np.round(b / np.where(d32 == 0, 1.0, d32)), lo, hi)
    q[(d32 == 0)[:, 0]] = 0
    return best_d[:, 0], q.astype(np.int8)


def _compensated(data: np.ndarray, hessian: np.ndarray, scales: np.ndarray, kind) -> np.ndarray:
    """GPTQ's levels for `data` [rows, cols] with its blocks' `scales` fixed -> [blocks, 32] int8. Columns go in
    order of decreasing input energy; each one's rounding error, divided by the pivot of the upper Cholesky factor
    U of (X^T X)^-1, is taken off the columns still to round along U's row (Frantar et al. 2022, with lazy
    updates every STEP columns)."""
    lo, hi = LEVELS[kind]
    rows, cols = data.shape
    h = torch.from_numpy(np.array(hessian, dtype=np.float64))
    diag = torch.diagonal(h)
    diag[diag <= 0] = 1.0  # an input never seen: nothing to compensate against
    order = torch.argsort(diag, descending=True, stable=True)
    h = h[order][:, order] + DAMP * diag.mean() * torch.eye(cols, dtype=torch.float64)
    u = _inverse_factor(h)
    if u is None:  # not positive definite even damped: the searched rounding stands
        return _search_levels(data, scales, kind)
    # one row per column, so that each step of the loop reads and writes contiguous memory
    w = torch.from_numpy(data.astype(np.float64)).T[order].contiguous()
    s = torch.from_numpy(scales.astype(np.float64)).reshape(rows, cols // BLOCK).T[order // BLOCK].contiguous()
    safe, kept = torch.where(s == 0, torch.ones_like(s), s), (s != 0).double()
    q = torch.empty_like(w)
    with one_thread():  # thousands of tiny steps: threads only add hand-offs (and stall when cores are busy)
        for a in range(0, cols, STEP):
            b = min(a + STEP, cols)
            part, errors = w[a:b].clone(), torch.empty(b - a, rows, dtype=torch.float64)
            for i in range(b - a):
                c = a + i
                q[c] = torch.clamp(torch.round(part[i] / safe[c]), lo, hi) * kept[c]
                errors[i] = (part[i] - q[c] * s[c]) / u[c, c]
                part[i:] -= u[c, c:b, None] * errors[i]
            w[b:] -= u[a:b, b:].T @ errors
    return q[torch.argsort(order)].T.reshape(-1, BLOCK).to(torch.int8).numpy()


@contextlib.contextmanager
def one_thread():
    """PyTorch on one thread inside the block, as many as before after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """The upper Cholesky factor of h^-1, or None when h is not positive definite."""
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        return None


def _search_levels(data: np.ndarray, scales: np.ndarray, kind) -> np.ndarray:
    """Each value rounded to its nearest level under its block's scale -> [blocks, 32] int8."""
    lo, hi = LEVELS[kind]
    d = scales.astype(np.float32)[:, None]
    q = np.clip(np.round(data.astype(np.float32).reshape(-1, BLOCK) / np.where(d == 0, 1.0, d)), lo, hi)
    return np.where(d == 0, 0, q).astype(np.int8)


def _pack(scales: np.ndarray, levels: np.ndarray, kind) -> np.ndarray:
    """Blocks in ggml's layout: the float16 scale (little-endian), then the levels (Q8_0: one signed byte each;
    Q4_0: level + 8 in nibbles, byte j holding value j low and value j + 16 high)."""
    d = scales.astype("<f2").view(np.uint8).reshape(-1, 2)
    if kind == Q8_0:
        body = levels.view(np.uint8)
    else:
        u = (levels.astype(np.int16) + 8).astype(np.uint8)
        body = u[:, :BLOCK // 2] | (u[:, BLOCK // 2:] << 4)
    return np.concatenate([d, body], 1)
