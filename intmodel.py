"""A bit-exact integer reference of the quantized Transformer in NumPy (no TensorFlow).

It reads an export of `export.py` and computes every matrix multiplication as the accelerator
will: both operands are integers on their sites' power-of-two grids,

    q = clip(R(x * 2^f), n, p)            (qformat.Grid.quantize: the site's grid and rounding)
    acc = sum_k q_x[k] q_w[k] + q_b       (exact integer accumulate; q_b the int32 bias)
    y = acc * 2^-(f_x + f_w)              (rounded once to float32)

Everything between matmuls mirrors model.py in float32: the embedding lookup (the integer
table times 2^-f) * sqrt(d_model) + sinusoidal positions, LayerNorm, residual adds, the
1/sqrt(d_k) scaling, additive -1e9 masks, softmax, ReLU.

Grids, roundings, site and matmul names and the export format are defined in `qformat.py`.

Layout: exact integer accumulation; the float parts; the engine (matmuls, layers, the
teacher-forced forward, beam search); translating text; golden vectors for test benches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

import data_load
import intops
import qformat
from qformat import BOS, EOS, PAD, Grid

# float64 holds every integer up to 2^53 exactly; float32 up to 2^24
FLOAT64_EXACT, FLOAT32_EXACT = 2**53, 2**24


# --------------------------------------------------------------------------------------------
# Exact integer accumulation
# --------------------------------------------------------------------------------------------


def accumulator_bound(k: int, gx: Grid, gw: Grid) -> int:
    """K * max|q_x| * max|q_w|: no partial sum of a K-term product of these grids is larger.
    A Python integer, so a wide layer's bound cannot wrap."""
    return k * gx.max_abs * gw.max_abs


def bias_dtype(bound: int, bias: np.ndarray) -> type:
    """float32 when every accumulator (|acc| <= bound) plus the int32 bias stays below 2^24, so
    the float32 add is exact; float64 otherwise. |-2^31| is taken in int64, where it exists."""
    largest = int(np.abs(bias.astype(np.int64)).max(initial=0))
    return np.float32 if bound + largest < FLOAT32_EXACT else np.float64


def check_exact(k: int, gx: Grid, gw: Grid) -> None:
    """Raise OverflowError unless a K-term accumulation is exact in float64:

        |acc| <= K * max|q_x| * max|q_w| + 2^31 (bias) < 2^53,

    where max|q| = 2^(b-1) (signed) or 2^b - 1 (unsigned), so for signed operands
    |acc| <= K * 2^(bx-1) * 2^(bw-1) + 2^31. With b <= 16 each product is at most 2^31, so any
    K < 2^21 qualifies: every sum of integer products is then an integer below
    2^53, each partial sum is exactly representable whatever the summation order, and
    float64 arithmetic on them equals int64 arithmetic.
    """
    if accumulator_bound(k, gx, gw) + 2**31 >= FLOAT64_EXACT:
        raise OverflowError(f"a {k}-term accumulation of {gx.bits}x{gw.bits}-bit products "
                            "could exceed 2^53")


# --------------------------------------------------------------------------------------------
# Float parts (float32, as the TF graph)
# --------------------------------------------------------------------------------------------


# As in modules.in_float64, LayerNorm, softmax and the positions are computed in float64 and
# rounded once to float32: NumPy and TF reduce in different orders, and in float32 a one-ULP
# difference could cross a rounding boundary of the next quantizer; rounded from float64 both
# engines get the same float32.


def positional_encoding(length: int, d_model: int, start: int = 0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...) for pos in
    [start, start + length), float64 -> float32."""
    pos = np.arange(start, start + length, dtype=np.float64)[:, None]
    i = np.arange(d_model // 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, 2.0 * i / d_model)
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(length, d_model).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """softmax(x) = exp(x - max) / sum(exp(x - max)) over the last axis, float64 -> float32."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax(x) = (x - max) - log(sum(exp(x - max))), in float64 (beam scores stay float64)."""
    shifted = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """gamma * (x - mean) * rsqrt(var + eps) + beta over the last axis, var = mean((x - mean)^2),
    float64 -> float32."""
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=-1, keepdims=True)
    var = np.square(centered).mean(axis=-1, keepdims=True)
    y = gamma.astype(np.float64) * centered / np.sqrt(var + eps) + beta.astype(np.float64)
    return y.astype(np.float32)


def padding_bias(ids: np.ndarray) -> np.ndarray:
    """[B, 1, 1, L]: -1e9 at padding keys, 0 elsewhere."""
    return (ids == PAD).astype(np.float32)[:, None, None, :] * np.float32(qformat.NEG_INF)


def causal_bias(length: int) -> np.ndarray:
    """[1, 1, L, L]: query i sees keys j <= i."""
    future = 1.0 - np.tril(np.ones((length, length), np.float32))
    return future[None, None] * np.float32(qformat.NEG_INF)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def _gemm(x: np.ndarray, w: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """x @ w in `dtype`; a 2-D w as one GEMM over all rows (np.matmul would loop over the
    leading axes)."""
    x, w = x.astype(dtype, copy=False), w.astype(dtype, copy=False)
    if w.ndim == 2:
        return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])
    return np.matmul(x, w)


@dataclass
class MatmulRecord:
    """One integer matmul while tracing: its operands (as the sites produced them, before any
    transpose) and the accumulator acc = x @ w (+ bias); `abs_bound` = max(|x| @ |w|), which
    bounds every partial sum whatever the order (float32 is exact while it is < 2^24)."""

    name: str
    x_site: str
    x: np.ndarray
    w_site: str
    w: np.ndarray
    acc: np.ndarray
    abs_bound: float


class IntTransformer:
    """The integer engine. `arrays` maps names to the export's tensors (integer weights keyed
    by site name, `<dense>/bias` int32, `<ln>/gamma|beta` float32, `<site>.bits|signed|f`);
    `config` has num_heads, num_blocks, decode_margin, rounding, layer_norm_eps."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: Mapping):
        self.config = dict(config)
        self.rounding = self.config["rounding"]
        self.num_heads = int(self.config["num_heads"])
        self.grids = qformat.grids_of(arrays)
        # integers held in floats: weights (<= 16 bits) exactly in float32; a bias in float32
        # when accumulator + bias provably stays below 2^24 (then the add is exact), else float64
        self.ints = {k: v.astype(np.float32) for k, v in arrays.items()
                     if v.dtype.kind in "iu" and not k.endswith(qformat.GRID_FIELDS)}
        for key in [k for k in self.ints if k.endswith("/bias")]:
            names = qformat.dense(key.removesuffix("/bias"))
            bound = accumulator_bound(self.ints[names.weight].shape[0], self.grids[names.input],
                                      self.grids[names.weight])
            self.ints[key] = arrays[key].astype(bias_dtype(bound, arrays[key]))
        # floats (LayerNorm) as float32
        self.floats = {k: v.astype(np.float32) for k, v in arrays.items() if v.dtype.kind == "f"}
        self.trace: list[MatmulRecord] | None = None
        self.observe = True  # track each accumulator's largest magnitude (accumulator_stats)
        self.manifest: dict | None = None  # set by load()
        self._acc_max: dict[str, int] = {}
        self._plans: dict[tuple[str, str, int], tuple[int, type, np.ndarray, str]] = {}
        if qformat.EMBEDDING in self.ints:
            self.vocab, self.d_model = self.ints[qformat.EMBEDDING].shape
            if not self.config.get("integer_only"):  # the float lookup (integer-only: a table)
                self.table = self.ints[qformat.EMBEDDING] * self._scale(qformat.EMBEDDING).astype(np.float32)

    @classmethod
    def load(cls, export_dir: str) -> IntTransformer:
        """Load and verify an export: format version, SHA-256 of model.npz and spm.model,
        integer weights. Any problem is an ExportError naming the file. An integer-only export
        gives an IntOnlyTransformer."""
        manifest = qformat.read_manifest(export_dir)
        arrays = qformat.load_arrays(export_dir, manifest)
        qformat.verify_file(os.path.join(export_dir, qformat.SPM), manifest["spm"]["sha256"], "spm model")
        engine_class = IntOnlyTransformer if manifest["model"].get("integer_only") else cls
        engine = engine_class(arrays, manifest["model"])
        engine.manifest = manifest
        return engine

    def _scale(self, site: str) -> np.ndarray:
        return np.exp2(-self.grids[site].f.astype(np.float64))

    # ---- integer matmuls --------------------------------------------------------------------

    def quantize(self, site: str, x: np.ndarray) -> np.ndarray:
        return self.grids[site].quantize(x, self.rounding)

    def matmul(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray,
               bias: np.ndarray | None = None, transpose_w: bool = False) -> np.ndarray:
        """acc = x @ w (+ bias) on integers, exact (`accumulate`); y = acc * 2^-(f_x + f_w)
        rounded to float32. The TF graph computes the same sum in float32 on q * 2^-f, exact
        while every partial sum stays below 2^24 in integer units."""
        acc, scale = self.accumulate(x_site, x, w_site, w, transpose_w)
        if bias is not None:  # exact: float32 only when both fit below 2^24 (see __init__)
            acc = acc + bias
        self.record_matmul(x_site, x, w_site, w, acc, transpose_w)
        # times a power of two, rounded once to float32 (exact when acc is already float32)
        acc *= scale.astype(acc.dtype)
        return acc.astype(np.float32, copy=False)

    def accumulate(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray,
                   transpose_w: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(x @ w, 2^-(f_x + f_w)): the integer sums, exact, held in float32 or float64 (`_plan`;
        float32 BLAS is the exact carrier of integer GEMMs while it stays below 2^24)."""
        k = x.shape[-1]
        chunk, dtype, scale, _ = self._plan(x_site, w_site, k)
        w_mat = np.swapaxes(w, -1, -2) if transpose_w else w
        acc = _gemm(x[..., :chunk], w_mat[..., :chunk, :], dtype)
        for lo in range(chunk, k, chunk):
            acc = acc.astype(np.float64) + _gemm(x[..., lo:lo + chunk], w_mat[..., lo:lo + chunk, :])
        return acc, scale

    def record_matmul(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray, acc: np.ndarray,
                      transpose_w: bool) -> None:
        """Track the accumulator's largest magnitude (while `observe`) and, while tracing, the call."""
        name = qformat.matmul_of(x_site)
        if self.observe:
            self._observe(name, acc)
        if self.trace is not None:
            w_mat = np.swapaxes(w, -1, -2) if transpose_w else w
            bound = float(np.matmul(np.abs(x), np.abs(w_mat)).max(initial=0.0))
            self.trace.append(MatmulRecord(name, x_site, x, w_site, w, acc.astype(np.float64), bound))

    def _plan(self, x_site: str, w_site: str, k: int) -> tuple[int, type, np.ndarray, str]:
        """How a K-term matmul of these sites runs, worked out once: float32 BLAS is exact while
        |every partial sum| < 2^24, so K is cut into chunks that keep below it and (when there
        is more than one) the chunk sums are added in float64; when one product can pass 2^24
        (wide operands) the GEMM runs in float64 (exact below 2^53, `check_exact`).
        Returns (chunk, dtype of the first chunk, 2^-(f_x + f_w), matmul name)."""
        key = (x_site, w_site, k)
        if key not in self._plans:
            gx, gw = self.grids[x_site], self.grids[w_site]
            check_exact(k, gx, gw)
            product = accumulator_bound(1, gx, gw)
            chunk = (FLOAT32_EXACT - 1) // product or k
            dtype = np.float32 if chunk * product < FLOAT32_EXACT else np.float64
            self._plans[key] = (chunk, dtype, np.exp2(-(gx.f + gw.output_f)), qformat.matmul_of(x_site))
        return self._plans[key]

    def _observe(self, name: str, acc: np.ndarray, register_bits: int | None = 32) -> None:
        """Track max |acc| per matmul (or reduction); warn once on stderr when it needs more than
        `register_bits` (None: wide by design, e.g. LayerNorm's variance)."""
        largest = int(max(acc.max(initial=0.0), -acc.min(initial=0.0)))
        if largest <= self._acc_max.get(name, -1):
            return
        self._acc_max[name] = largest
        if register_bits and _signed_bits(largest) > register_bits:
            print(f"warning: {name} accumulator reached {largest} ({_signed_bits(largest)} bits "
                  f"> {register_bits})", file=sys.stderr)

    def accumulator_stats(self) -> dict[str, dict[str, int]]:
        """{matmul: {"max_abs": largest |accumulator| seen, "bits": two's-complement bits}}."""
        return {name: {"max_abs": m, "bits": _signed_bits(m)} for name, m in self._acc_max.items()}

    @contextlib.contextmanager
    def tracing(self) -> Iterator[list[MatmulRecord]]:
        """Record every matmul (operands and accumulator) while inside the block."""
        self.trace = []
        try:
            yield self.trace
        finally:
            self.trace = None

    # ---- layers -----------------------------------------------------------------------------

    def dense(self, prefix: str, x: np.ndarray) -> np.ndarray:
        """y = Q(x) W_q (+ b_q) * 2^-(f_x + f_w)."""
        names = qformat.dense(prefix)
        return self.matmul(names.input, self.quantize(names.input, x), names.weight,
                           self.ints[names.weight], self.ints.get(names.bias))

    def split_heads(self, x: np.ndarray) -> np.ndarray:
        """[B, L, d] -> [B, h, L, d_k]."""
        b, length, d = x.shape
        return x.reshape(b, length, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    def project_kv(self, prefix: str, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V heads, already requantized to the key/value sites' grids: the TF graph
        requantizes the whole (cached) tensor at every step, which gives the same integers
        (elementwise), so here each key and value is quantized once, when it is computed."""
        names = qformat.attention(prefix)
        k, v = self.dense(names.wk, memory), self.dense(names.wv, memory)
        # contiguous copies: every later decoder step multiplies by them
        return (np.ascontiguousarray(self.quantize(names.key, self.split_heads(k))),
                np.ascontiguousarray(self.quantize(names.value, self.split_heads(v))))

    def attend(self, prefix: str, x: np.ndarray, k: np.ndarray, v: np.ndarray,
               bias: np.ndarray) -> np.ndarray:
        """softmax(Q(q) k^T / sqrt(d_k) + bias) -> Q(P) v, heads concatenated, W^O; k and v are
        integers from project_kv."""
        names = qformat.attention(prefix)
        q = self.split_heads(self.dense(names.wq, x))
        logits = self.matmul(names.query, self.quantize(names.query, q), names.key, k, transpose_w=True)
        d_k = q.shape[-1]
        probs = softmax(logits * np.float32(1.0 / math.sqrt(d_k)) + bias)
        heads = self.matmul(names.probs, self.quantize(names.probs, probs), names.value, v)
        b, _, lq, _ = heads.shape
        return self.dense(names.wo, heads.transpose(0, 2, 1, 3).reshape(b, lq, -1))

    def attention(self, prefix: str, x: np.ndarray, memory: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.attend(prefix, x, *self.project_kv(prefix, memory), bias)

    def ffn(self, prefix: str, x: np.ndarray) -> np.ndarray:
        """dense2(Q_unsigned(max(0, dense1(x))))."""
        names = qformat.feed_forward(prefix)
        return self.dense(names.dense2, np.maximum(self.dense(names.dense1, x), 0))

    def layer_norm(self, prefix: str, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.floats[f"{prefix}/gamma"], self.floats[f"{prefix}/beta"],
                          self.config["layer_norm_eps"])

    def embed(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
        """E_q[ids] * 2^-f * sqrt(d) + PE[offset : offset + L]."""
        pe = positional_encoding(ids.shape[1], self.d_model, start=offset)
        return self.table[ids] * np.float32(math.sqrt(self.d_model)) + pe

    def logits(self, y: np.ndarray) -> np.ndarray:
        """Q(y) E_q^T: the output projection with the shared integer table."""
        site = qformat.OUTPUT_INPUT
        return self.matmul(site, self.quantize(site, y), qformat.EMBEDDING,
                           self.ints[qformat.EMBEDDING], transpose_w=True)

    # ---- the model --------------------------------------------------------------------------

    def encode(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Memory [B, Ls, d] and the source padding bias."""
        bias = padding_bias(src)
        x = self.embed(src)
        for i in range(self.config["num_blocks"]):
            names = qformat.block_names("encoder", i)
            x = self.layer_norm(names.norms[0], x + self.attention(names.self_attention, x, x, bias))
            x = self.layer_norm(names.norms[1], x + self.ffn(names.ffn, x))
        return x, bias

    def decoder_block(self, i: int, y: np.ndarray, self_kv: tuple, self_bias: np.ndarray,
                      cross_kv: tuple, src_bias: np.ndarray) -> np.ndarray:
        names = qformat.block_names("decoder", i)
        ln1, ln2, ln3 = names.norms
        y = self.layer_norm(ln1, y + self.attend(names.self_attention, y, *self_kv, self_bias))
        y = self.layer_norm(ln2, y + self.attend(names.cross_attention, y, *cross_kv, src_bias))
        return self.layer_norm(ln3, y + self.ffn(names.ffn, y))

    def decode(self, tgt_in: np.ndarray, memory: np.ndarray, src_bias: np.ndarray) -> np.ndarray:
        """Teacher-forced decoder over a whole prefix: logits [B, Lt, V]."""
        y = self.embed(tgt_in)
        self_bias = causal_bias(tgt_in.shape[1]) + padding_bias(tgt_in)  # as model.decode
        for i in range(self.config["num_blocks"]):
            names = qformat.block_names("decoder", i)
            self_kv = self.project_kv(names.self_attention, y)
            cross_kv = self.project_kv(names.cross_attention, memory)
            y = self.decoder_block(i, y, self_kv, self_bias, cross_kv, src_bias)
        return self.logits(y)

    def forward(self, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
        """Teacher-forced logits [B, Lt, V] for int sources [B, Ls] and decoder inputs [B, Lt]."""
        memory, src_bias = self.encode(np.asarray(src))
        return self.decode(np.asarray(tgt_in), memory, src_bias)

    # ---- decoding ---------------------------------------------------------------------------

    def _step(self, token: np.ndarray, t: int, cache: list, cross_kv: list,
              src_bias: np.ndarray) -> np.ndarray:
        """One cached decoder step at position t: logits [N, V]; writes keys/values at t into
        `cache`.  model.Transformer._step attends over the whole cache with the positions
        after t masked (-1e9: probability exactly 0, so they add nothing to P V); here the
        step attends over positions 0..t only, which gives the same values."""
        y = self.embed(token[:, None], offset=t)
        no_mask = np.float32(0.0)
        for i, ((k, v), kv) in enumerate(zip(cache, cross_kv)):
            k_t, v_t = self.project_kv(qformat.block_names("decoder", i).self_attention, y)
            k[:, :, t], v[:, :, t] = k_t[:, :, 0], v_t[:, :, 0]
            y = self.decoder_block(i, y, (k[:, :, :t + 1], v[:, :, :t + 1]), no_mask, kv, src_bias)
        return self.logits(y)[:, 0]

    def logit_values(self, logits: np.ndarray) -> np.ndarray:
        """The logits as real values, for ranking beam hypotheses (here already float32)."""
        return logits

    def _start(self, src: np.ndarray, beam: int) -> tuple:
        """Encoder pass and per-row decoding state, each source row repeated `beam` times:
        (source bias, output limit per row, cross-attention K/V per block, empty K/V cache)."""
        memory, src_bias = self.encode(src)
        memory, src_bias = np.repeat(memory, beam, 0), np.repeat(src_bias, beam, 0)
        # at most (non-pad source tokens + decode_margin) outputs per sentence
        limit = np.repeat((src != PAD).sum(axis=1) + self.config["decode_margin"], beam)
        cross_kv = [self.cross_kv(qformat.block_names("decoder", i).cross_attention, memory)
                    for i in range(self.config["num_blocks"])]
        shape = (len(limit), self.num_heads, int(limit.max()), self.d_model // self.num_heads)
        cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                 for _ in range(self.config["num_blocks"])]
        return src_bias, limit, cross_kv, cache

    def cross_kv(self, prefix: str, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A decoder block's cross-attention K and V of the encoder memory."""
        return self.project_kv(prefix, memory)

    def greedy(self, src: np.ndarray) -> np.ndarray:
        """Batched greedy decoding with a key/value cache: token ids [B, T], PAD after EOS.

        Each step takes the first maximum of the logits.  TF's greedy (beam search with one
        beam) ranks score + log_softmax(logits) in float64, which orders the tokens as the
        logits do; the two could part only if two logits were within float64 rounding of
        each other.  beam_search(src, 1) computes it TF's way.  Finished sentences leave the
        batch (cache rows too) once they are an eighth of it: every op works row by row, so the
        others are unchanged."""
        src = np.asarray(src)
        src_bias, limit, cross_kv, cache = self._start(src, 1)
        out = np.full((len(src), int(limit.max())), PAD, np.int64)
        rows = np.arange(len(src))  # the sentences in the batch arrays
        going = np.ones(len(src), bool)  # which of them still decode
        token = np.full(len(src), BOS)
        for t in range(out.shape[1]):
            token = np.where(going, np.argmax(self._step(token, t, cache, cross_kv, src_bias), 1), PAD)
            out[rows[going], t] = token[going]
            going &= (token != EOS) & (t + 1 < limit)
            if not going.any():
                break
            if 8 * np.count_nonzero(~going) >= len(going):  # drop finished rows by eighths
                rows, token, limit, src_bias = rows[going], token[going], limit[going], src_bias[going]
                cache = [(k[going], v[going]) for k, v in cache]
                cross_kv = [(k[going], v[going]) for k, v in cross_kv]
                going = going[going]
        return out

    def beam_search(self, src: np.ndarray, beam: int, alpha: float = 0.6) -> np.ndarray:
        """model.Transformer.beam_search_impl in NumPy: `beam` hypotheses per sentence ranked
        by summed log-probability; a finished one continues with PAD at cost 0; at most
        (non-pad source tokens + decode_margin) outputs; the winner maximizes
        score / ((5 + len) / 6)^alpha (GNMT). Returns [B, T], PAD after EOS."""
        src = np.asarray(src)
        batch, rows = src.shape[0], src.shape[0] * beam
        src_bias, limit, cross_kv, cache = self._start(src, beam)
        length = cache[0][0].shape[2]
        # only beam 0 is live at the start, so the copies do not all pick the same tokens
        scores = np.tile(np.array([0.0] + [-1e30] * (beam - 1), np.float64), (batch, 1))
        pad_only = np.full(self.vocab, -1e30, np.float64)
        pad_only[PAD] = 0.0
        token = np.full(rows, BOS)
        finished, lengths = np.zeros(rows, bool), np.zeros(rows, np.int64)
        seqs = np.zeros((rows, length), np.int64)
        t = 0
        while t < length and not finished.all():
            logp = log_softmax(self.logit_values(self._step(token, t, cache, cross_kv, src_bias)))
            logp = np.where(finished[:, None], pad_only[None], logp)
            total = (scores.reshape(rows, 1) + logp).reshape(batch, beam * self.vocab)
            index = np.argsort(-total, axis=1, kind="stable")[:, :beam]  # as top_k: ties -> lower index
            scores = np.take_along_axis(total, index, axis=1)
            parent = (index // self.vocab + np.arange(batch)[:, None] * beam).reshape(rows)
            token = (index % self.vocab).reshape(rows)
            was_finished = finished[parent]
            seqs = seqs[parent]
            cache = [(k[parent], v[parent]) for k, v in cache]
            seqs[:, t] = token
            finished = was_finished | (token == EOS) | (t + 1 >= limit)
            lengths = lengths[parent] + ~was_finished
            t += 1
        penalty = np.power((5.0 + lengths.astype(np.float64)) / 6.0, alpha)
        best = np.argmax(scores / penalty.reshape(batch, beam), axis=1)
        return seqs.reshape(batch, beam, length)[np.arange(batch), best]


# --------------------------------------------------------------------------------------------
# The integer-only engine
# --------------------------------------------------------------------------------------------


@dataclass
class OpRecord:
    """One integer op of the integer-only path while tracing: its name (the site or matmul it
    produces, or `<ln>/layer_norm`, `<attn>/softmax`), its kind and its integer inputs and output."""

    name: str
    kind: str
    inputs: dict[str, np.ndarray]
    output: np.ndarray


class IntOnlyTransformer(IntTransformer):
    """The engine of an integer-only export: from token ids to the greedy argmax every tensor is an
    int64 array on a power-of-two grid, every rescale a shift (intops), every kernel integer.

    Only the GEMMs hold their integer operands in float32 (or float64) as an exact carrier for
    BLAS (`accumulate`: each partial sum provably below 2^24, or 2^53), including the cached keys
    and values; their results come back as int64 at once. Every op's output passes `emit`, which
    refuses a non-integer array, so no float can enter the path unnoticed.

    Extra arrays: `<ln>/gamma` (on the gamma site), `<ln>/beta` (int64 on f_gamma + LN_F),
    `<ln>/eps_q`, `embedding_sum/lookup` (R(Q(E) sqrt(d)) on the embedding-sum grid) and
    `embedding_sum/positions` (R(PE), max_positions rows)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: Mapping):
        super().__init__(arrays, config)
        self.int64 = {k: np.asarray(v, np.int64) for k, v in arrays.items()
                      if v.dtype.kind in "iu" and not k.endswith(qformat.GRID_FIELDS)}
        self.d_k = self.d_model // self.num_heads
        self.ops: list[OpRecord] | None = None  # while tracing
        self._edges: dict[tuple[str, str], tuple[object, str]] = {}
        self._bounds: dict[str, int] = {}  # proven max |value| of each matmul and reduction
        # the reductions (LayerNorm variance, softmax and residual sums) are observed too; the
        # export's data sheet and eval turn observing on, plain decoding does not pay for it
        self.observe = False
        self.max_positions = len(self.int64[f"{qformat.EMBEDDING_SUM}/positions"])
        softmax_constants = list(intops.exp_constants(intops.EXP_F, self.d_k))
        if list(self.config.get("softmax_constants", softmax_constants)) != softmax_constants:
            raise qformat.ExportError(f"the export's softmax constants {self.config['softmax_constants']} "
                                      f"are not intops.exp_constants(F, d_k) = {softmax_constants}")

    # ---- integers in, integers out -----------------------------------------------------------

    def emit(self, name: str, kind: str, out: np.ndarray, **inputs: np.ndarray) -> np.ndarray:
        """Every op's result passes here: an integer array, or TypeError (a float on the path)."""
        if out.dtype.kind not in "iub":
            raise TypeError(f"{kind} {name} produced {out.dtype} on the integer-only path")
        if self.ops is not None:
            self.ops.append(OpRecord(name, kind, inputs, out))
        return out

    def f(self, site: str) -> np.ndarray:
        return self.grids[site].f

    def requantize(self, q: np.ndarray, f_from, source: str, site: str) -> np.ndarray:
        """clip(R(q 2^(f_site - f_from))): the edge source -> site, a shift (left when finer)."""
        grid = self.grids[site]
        shift = np.asarray(f_from) - grid.f
        self._edges[(source, site)] = (shift, self.rounding)
        return self.emit(site, "requantize", intops.requantize(q, shift, grid.bits, grid.signed,
                                                                self.rounding))

    def imatmul(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray,
                bias: np.ndarray | None = None, transpose_w: bool = False,
                k_max: int | None = None) -> np.ndarray:
        """acc = x @ w (+ bias) on the grid f_x + f_w, int32 when its proven bound
        K max|x| max|w| + max|b| (K = k_max, the longest sequence, or the contracted length) is
        below 2^30 (a 32-bit lane, intops.shift_round keeps it), else int64."""
        name = qformat.matmul_of(x_site)
        if name not in self._bounds:
            largest_bias = 0 if bias is None else int(np.abs(bias).max(initial=0))
            k = k_max or x.shape[-1]
            self._bounds[name] = accumulator_bound(k, self.grids[x_site], self.grids[w_site]) + largest_bias
        lane = np.int32 if self._bounds[name] < 1 << 30 else np.int64
        acc = self.accumulate(x_site, x, w_site, w, transpose_w)[0].astype(lane)
        if bias is not None:
            acc += bias.astype(lane)  # exact: the bound includes the bias
        self.record_matmul(x_site, x, w_site, w, acc, transpose_w)
        return self.emit(name, "matmul", acc)

    def dense(self, prefix: str, x: np.ndarray, f_x, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(acc, f_acc): acc = Q(x) W_q + b_q on the grid f_acc = f_x + f_w."""
        names = qformat.dense(prefix)
        q = self.requantize(x, f_x, source, names.input)
        acc = self.imatmul(names.input, q, names.weight, self.ints[names.weight], self.int64.get(names.bias))
        return acc, self.f(names.input) + self.f(names.weight)

    # ---- layers -----------------------------------------------------------------------------

    def embed(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
        """x_0 = clip(L[ids] + P[offset : offset + len]) on the embedding-sum grid."""
        positions = self.int64[f"{qformat.EMBEDDING_SUM}/positions"]
        end = offset + ids.shape[1]
        if end > len(positions):
            raise ValueError(f"a sequence of {end} positions is longer than the export's position "
                             f"table ({len(positions)}): re-export with a larger --max_positions")
        total = self.int64[f"{qformat.EMBEDDING_SUM}/lookup"][ids] + positions[offset:end]
        grid = self.grids[qformat.EMBEDDING_SUM]
        total = intops.clip_to(total, grid.bits, grid.signed)
        return self.emit(qformat.EMBEDDING_SUM, "embedding_sum", total)

    def add_norm(self, prefix: str, x: np.ndarray, x_source: str, a: np.ndarray, f_a, a_source: str
                 ) -> np.ndarray:
        """LN(x + a): x on the grid of site x_source, a the accumulator a_source on f_a; the sum
        exact on the finer grid g, requantized onto `<ln>/input`, then intops.layer_norm onto
        `<ln>/output`."""
        names = qformat.layer_norm(prefix)
        f_x, grid = self.f(x_source), self.grids[names.input]
        g = np.maximum(f_x, f_a)
        total = intops.shift_round(x, f_x - g, "floor")  # fresh int64: the add in place
        total += intops.shift_round(a, f_a - g, "floor")
        if f"{prefix}/residual_sum" not in self._bounds:
            self._bounds[f"{prefix}/residual_sum"] = int(np.max(
                (self.grids[x_source].max_abs << (g - f_x)) + (self._bounds[a_source] << (g - f_a))))
        if self.observe:
            self._observe(f"{prefix}/residual_sum", total, None)
        # each operand's total shift onto the residual grid; the sum is rounded once
        self._edges[(x_source, names.input)] = (f_x - grid.f, self.rounding)
        self._edges[(a_source, names.input)] = (np.asarray(f_a) - grid.f, self.rounding)
        r = intops.requantize(total, g - grid.f, grid.bits, grid.signed, self.rounding)
        r = self.emit(names.input, "residual", r, x=x, a=a)
        out_grid, f_gamma = self.grids[names.output], int(self.f(names.gamma))
        beta, eps_q = self.int64[names.beta], self.int64[f"{prefix}/eps_q"]
        d = r.shape[-1]
        self._bounds.setdefault(f"{prefix}/variance", d * d * (grid.max_abs ** 2 + int(eps_q)))
        if self.observe:
            self._observe(f"{prefix}/variance", intops.layer_norm_moments(r, eps_q)[1], None)
        out = intops.layer_norm(r, self.int64[names.gamma], beta, eps_q, f_gamma, int(out_grid.f),
                                out_grid.bits, self.rounding)
        return self.emit(names.output, "layer_norm", out, input=r)

    def project_kv(self, prefix: str, x: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        """K and V heads on the key/value grids, held in float32 as GEMM operands (exact)."""
        names = qformat.attention(prefix)
        heads = []
        for dense, site in ((names.wk, names.key), (names.wv, names.value)):
            acc, f_acc = self.dense(dense, x, self.f(source), source)
            q = self.requantize(acc, f_acc, dense, site)
            heads.append(np.ascontiguousarray(self.split_heads(q), np.float32))
        return heads[0], heads[1]

    def attend(self, prefix: str, x: np.ndarray, source: str, k: np.ndarray, v: np.ndarray,
               visible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(acc, f_acc) of W^O over the heads softmax(Q K^T / sqrt(d_k)) V; `visible` the bool
        key mask (None: every key)."""
        names = qformat.attention(prefix)
        acc, f_acc = self.dense(names.wq, x, self.f(source), source)
        q = self.split_heads(self.requantize(acc, f_acc, names.wq, names.query))
        scores = self.imatmul(names.query, q, names.key, k, transpose_w=True)
        f_s = int(self.f(names.query) + self.f(names.key))
        probs_grid = self.grids[names.probs]
        self._edges[(qformat.matmul_of(names.query), f"{prefix}/softmax")] = (
            f_s - intops.EXP_F, intops.EXP_ROUNDING)
        mask = None if visible is None else np.broadcast_to(visible, scores.shape)
        exps = intops.softmax_exps(scores, f_s, mask, m=self.d_k)  # intops.softmax in two steps
        self._bounds.setdefault(f"{prefix}/softmax_sum",
                                self.max_positions * intops.exp_max(intops.EXP_F, self.d_k))
        if self.observe:
            self._observe(f"{prefix}/softmax_sum", exps.sum(axis=-1), None)
        probs = intops.normalize(exps, probs_grid.bits, self.rounding)
        probs = self.emit(names.probs, "softmax", probs, scores=scores,
                          visible=np.broadcast_to(True, scores.shape) if mask is None else mask)
        heads = self.imatmul(names.probs, probs, names.value, v, k_max=self.max_positions)
        b, _, lq, _ = heads.shape
        concat = heads.transpose(0, 2, 1, 3).reshape(b, lq, -1)
        return self.dense(names.wo, concat, self.f(names.probs) + self.f(names.value),
                          qformat.matmul_of(names.probs))

    def ffn(self, prefix: str, x: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        names = qformat.feed_forward(prefix)
        acc, f_acc = self.dense(names.dense1, x, self.f(source), source)
        relu = self.emit(names.dense1, "relu", np.maximum(acc, 0))
        return self.dense(names.dense2, relu, f_acc, names.dense1)

    def logits(self, y: np.ndarray, source: str) -> np.ndarray:
        """Integer logits Q(y) E_q^T on one grid, f_y + max(f_E) (`logit_frac_bits`), so that
        argmax compares integers: with a threshold per table row (--per_row_embedding) logit v
        is shifted left by max(f_E) - f_E[v], exact (int64)."""
        q = self.requantize(y, self.f(source), source, qformat.OUTPUT_INPUT)
        acc = self.imatmul(qformat.OUTPUT_INPUT, q, qformat.EMBEDDING, self.ints[qformat.EMBEDDING],
                           transpose_w=True)
        f_e = self.grids[qformat.EMBEDDING].output_f
        if f_e.ndim == 0:
            return acc
        return acc.astype(np.int64) << (f_e.max() - f_e)

    @property
    def logit_frac_bits(self) -> int:
        """f of the logits' grid: f_y + max(f_E)."""
        return int(self.f(qformat.OUTPUT_INPUT) + self.grids[qformat.EMBEDDING].output_f.max())

    def logit_values(self, logits: np.ndarray) -> np.ndarray:
        """Beam search ranks hypotheses by log-softmax in float64, outside the network."""
        return logits.astype(np.float64) * np.exp2(-np.float64(self.logit_frac_bits))

    # ---- the model --------------------------------------------------------------------------

    def _norm_output(self, side: str, i: int) -> str:
        """The site the input of block i (0-based) is on: the embedding sum or block i-1's output."""
        if i == 0:
            return qformat.EMBEDDING_SUM
        return qformat.layer_norm(qformat.block_names(side, i - 1).norms[-1]).output

    def encoder_block(self, i: int, x: np.ndarray, visible: np.ndarray) -> np.ndarray:
        names = qformat.block_names("encoder", i)
        source = self._norm_output("encoder", i)
        a, f_a = self.attention_over(names.self_attention, x, source, x, source, visible)
        x = self.add_norm(names.norms[0], x, source, a, f_a, qformat.attention(names.self_attention).wo)
        source = qformat.layer_norm(names.norms[0]).output
        a, f_a = self.ffn(names.ffn, x, source)
        return self.add_norm(names.norms[1], x, source, a, f_a, qformat.feed_forward(names.ffn).dense2)

    def attention_over(self, prefix: str, x: np.ndarray, source: str, memory: np.ndarray,
                       memory_source: str, visible: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        return self.attend(prefix, x, source, *self.project_kv(prefix, memory, memory_source), visible)

    def encode(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Memory [B, Ls, d] (int64 on the last encoder norm's output grid) and the key mask."""
        visible = (src != PAD)[:, None, None, :]
        x = self.embed(src)
        for i in range(self.config["num_blocks"]):
            x = self.encoder_block(i, x, visible)
        return x, visible

    def memory_source(self) -> str:
        return self._norm_output("encoder", self.config["num_blocks"])

    def decoder_block(self, i: int, y: np.ndarray, self_kv: tuple, self_visible, cross_kv: tuple,
                      src_visible: np.ndarray) -> np.ndarray:
        names = qformat.block_names("decoder", i)
        ln = [qformat.layer_norm(n).output for n in names.norms]
        source = self._norm_output("decoder", i)
        a, f_a = self.attend(names.self_attention, y, source, *self_kv, self_visible)
        y = self.add_norm(names.norms[0], y, source, a, f_a, qformat.attention(names.self_attention).wo)
        a, f_a = self.attend(names.cross_attention, y, ln[0], *cross_kv, src_visible)
        y = self.add_norm(names.norms[1], y, ln[0], a, f_a, qformat.attention(names.cross_attention).wo)
        a, f_a = self.ffn(names.ffn, y, ln[1])
        return self.add_norm(names.norms[2], y, ln[1], a, f_a, qformat.feed_forward(names.ffn).dense2)

    def decode(self, tgt_in: np.ndarray, memory: np.ndarray, src_visible: np.ndarray) -> np.ndarray:
        """Teacher-forced decoder over a whole prefix: integer logits [B, Lt, V]."""
        y = self.embed(tgt_in)
        length = tgt_in.shape[1]
        causal = np.tril(np.ones((length, length), bool))[None, None]
        self_visible = causal & (tgt_in != PAD)[:, None, None, :]
        for i in range(self.config["num_blocks"]):
            names = qformat.block_names("decoder", i)
            source = self._norm_output("decoder", i)
            self_kv = self.project_kv(names.self_attention, y, source)
            cross_kv = self.project_kv(names.cross_attention, memory, self.memory_source())
            y = self.decoder_block(i, y, self_kv, self_visible, cross_kv, src_visible)
        return self.logits(y, self._norm_output("decoder", self.config["num_blocks"]))

    def _step(self, token: np.ndarray, t: int, cache: list, cross_kv: list,
              src_visible: np.ndarray) -> np.ndarray:
        """One cached decoder step at position t over keys 0..t (model.Transformer._step masks the
        later ones: the integer softmax gives them exactly 0). Integer logits [N, V]."""
        y = self.embed(token[:, None], offset=t)
        for i, ((k, v), kv) in enumerate(zip(cache, cross_kv)):
            prefix = qformat.block_names("decoder", i).self_attention
            k_t, v_t = self.project_kv(prefix, y, self._norm_output("decoder", i))
            k[:, :, t], v[:, :, t] = k_t[:, :, 0], v_t[:, :, 0]
            y = self.decoder_block(i, y, (k[:, :, :t + 1], v[:, :, :t + 1]), None, kv, src_visible)
        return self.logits(y, self._norm_output("decoder", self.config["num_blocks"]))[:, 0]

    def cross_kv(self, prefix: str, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V of the encoder memory, which lies on the last encoder norm's output grid (the
        base _start does the rest; its source bias is here the key mask `visible`)."""
        return self.project_kv(prefix, memory, self.memory_source())

    def accumulator_stats(self) -> dict[str, dict[str, int]]:
        """Per matmul and reduction: the largest |value| seen and its bits, beside the proven
        bound (from the grids, the longest sequence `max_positions`) and its bits."""
        stats = super().accumulator_stats()
        for name, bound in self._bounds.items():
            stats.setdefault(name, {"max_abs": 0, "bits": 1})
            stats[name].update(proven_max_abs=int(bound), proven_bits=_signed_bits(int(bound)))
        return stats

    def edges(self) -> list[dict]:
        """Every grid change seen so far: source, destination, the right shift (negative: left)
        and its rounding."""
        return [{"from": src, "to": dst, "shift": np.asarray(shift).tolist(), "rounding": rounding}
                for (src, dst), (shift, rounding) in self._edges.items()]

    @contextlib.contextmanager
    def tracing_ops(self) -> Iterator[list[OpRecord]]:
        """Record every op of the integer-only path (name, kind, inputs, output) in the block."""
        self.ops = []
        try:
            yield self.ops
        finally:
            self.ops = None


def _signed_bits(magnitude: int) -> int:
    """Bits of a two's-complement register holding -magnitude .. magnitude."""
    return int(magnitude).bit_length() + 1


# --------------------------------------------------------------------------------------------
# Text in, text out
# --------------------------------------------------------------------------------------------


def translate_lines(engine: IntTransformer, sp, lines: list[str], batch_size: int,
                    beam: int = 1, alpha: float = 0.6) -> list[str]:
    """Detokenized translations of `lines` in order (batched as the TF model's: data_load's
    sources and batches), greedy or beam search."""
    hyps = [""] * len(lines)
    for index, src in data_load.eval_batches(data_load.encode_source(sp, lines), batch_size):
        out = engine.greedy(src) if beam == 1 else engine.beam_search(src, beam, alpha)
        for i, row in zip(index, out):
            hyps[i] = data_load.decode_ids(sp, row)
    return hyps


# --------------------------------------------------------------------------------------------
# Golden vectors for RTL test benches
# --------------------------------------------------------------------------------------------


def teacher_forced_trace(engine: IntTransformer, src: np.ndarray
                         ) -> tuple[np.ndarray, list[MatmulRecord], list[OpRecord]]:
    """Greedy-decode `src`, then trace the teacher-forced forward over [BOS] + the output
    (the decoder inputs that produced it). Returns (decoder inputs, matmul records, and the
    integer-only engine's LayerNorm and softmax records: [] for the other engine)."""
    out = engine.greedy(src)
    tgt_in = np.concatenate([np.full((len(src), 1), BOS), out[:, :-1]], axis=1)
    integer_only = isinstance(engine, IntOnlyTransformer)
    ops_context = engine.tracing_ops() if integer_only else contextlib.nullcontext([])
    with engine.tracing() as trace, ops_context as ops:
        engine.forward(src, tgt_in)
    return tgt_in, trace, [op for op in ops if op.kind in ("layer_norm", "softmax")]


def dump_vectors(engine: IntTransformer, src_ids, out_dir: str) -> list[dict]:
    """Golden vectors: every matmul of a teacher-forced forward over the greedy output.

    For the n-th matmul call, `vectors.npz` holds `<n>.<name>.x` (the activation site's
    integers), `<n>.<name>.w` (the other operand when it is an activation, e.g. K or V; a
    weight operand is the export's `mem/<site>.mem`) and `<n>.<name>.acc` (the accumulator,
    int64, bias included); `mem/` the same as `$readmemh` files (`write_mem`; accumulators 32
    bits, or 64 when they need more). `index.json` lists the calls in execution order with
    shapes, sites, bits and f. Also `src` and `tgt_in`. An integer-only export adds, after the
    matmuls, every LayerNorm's and softmax's integer input and output (`<n>.<name>.in|out`;
    a softmax also its bool key mask `.visible`), in execution order. Returns the index.
    """
    src = qformat.pad_batch(list(src_ids)) if isinstance(src_ids, list) else np.asarray(src_ids)
    tgt_in, trace, ops = teacher_forced_trace(engine, src)
    os.makedirs(os.path.join(out_dir, "mem"), exist_ok=True)
    arrays = {"src": src.astype(np.int32), "tgt_in": tgt_in.astype(np.int32)}
    index = []
    for n, rec in enumerate(trace):
        entry = {"call": n, "matmul": rec.name, "acc_shape": list(rec.acc.shape)}
        operands = [("x", rec.x_site, rec.x)]
        if rec.w_site.endswith("/weight"):
            entry["w"] = {"site": rec.w_site, "mem": qformat.mem_file_name(rec.w_site)}
        else:
            operands.append(("w", rec.w_site, rec.w))
        for tag, site, q in operands:
            grid = engine.grids[site]
            key = f"{n:04d}.{rec.name.replace('/', '.')}.{tag}"
            arrays[key] = q.astype(qformat.int_dtype(grid.bits, grid.signed))
            qformat.write_mem(os.path.join(out_dir, "mem", key + ".mem"), q, grid.bits, grid.signed)
            entry[tag] = {"site": site, "key": key, "shape": list(q.shape), "bits": grid.bits,
                          "signed": grid.signed, "f": grid.f.tolist()}
        key = f"{n:04d}.{rec.name.replace('/', '.')}.acc"
        wide = _signed_bits(int(np.abs(rec.acc).max(initial=0))) > qformat.BIAS_BITS
        bits = 64 if wide else qformat.BIAS_BITS
        arrays[key] = rec.acc.astype(np.int64)
        qformat.write_mem(os.path.join(out_dir, "mem", key + ".mem"), rec.acc, bits, True)
        entry["acc"] = {"key": key, "bits": bits}
        index.append(entry)
    for n, op in enumerate(ops, start=len(trace)):
        (tag, q_in), *_ = op.inputs.items()  # layer_norm: input, softmax: scores
        entry = {"call": n, "op": op.kind, "name": op.name}
        for suffix, q in (("in", q_in), ("out", op.output)):
            key = f"{n:04d}.{op.name.replace('/', '.')}.{suffix}"
            arrays[key] = q.astype(np.int64)
            width = 64 if _signed_bits(int(np.abs(q).max(initial=0))) > 32 else 32
            qformat.write_mem(os.path.join(out_dir, "mem", key + ".mem"), q, width, True)
            entry[suffix] = {"key": key, "shape": list(q.shape), "bits": width,
                             "tensor": tag if suffix == "in" else "output"}
        if "visible" in op.inputs:
            arrays[f"{n:04d}.{op.name.replace('/', '.')}.visible"] = np.asarray(op.inputs["visible"])
        index.append(entry)
    np.savez(os.path.join(out_dir, "vectors.npz"), **arrays)
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    return index
