"""The matmul-only integer engine: a bit-exact NumPy reference of the fake-quant TF model.

Every matrix multiplication runs as the accelerator will: both operands are integers on their
sites' power-of-two grids,

    q = clip(R(x * 2^f), n, p)            (fixed_point.Grid.quantize: the site's grid and rounding)
    acc = sum_k q_x[k] q_w[k] + q_b       (exact integer accumulate; q_b the int32 bias)
    y = acc * 2^-(f_x + f_w)              (rounded once to float32)

Everything between matmuls mirrors model.py in float32 (integer/float_ops.py): the embedding
lookup (the integer table times 2^-f) * sqrt(d_model) + sinusoidal positions, LayerNorm,
residual adds, the 1/sqrt(d_k) scaling, additive -1e9 masks, softmax, ReLU.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from integer import accumulation, export_format, float_ops, site_names
from integer.token_ids import PAD


@dataclass
class MatmulRecord:
    """One integer matmul while tracing: its operands (as the sites produced them, before any
    transpose) and the accumulator acc = x @ w (+ bias), w transposed first when `transpose_w`;
    `abs_bound` = max(|x| @ |w|), which bounds every partial sum whatever the order (float32 is
    exact while it is < 2^24)."""

    name: str
    x_site: str
    x: np.ndarray
    w_site: str
    w: np.ndarray
    acc: np.ndarray
    abs_bound: float
    transpose_w: bool


class IntTransformer:
    """The integer engine. `arrays` maps names to the export's tensors (integer weights keyed
    by site name, `<dense>/bias` int32, `<ln>/gamma|beta` float32, `<site>.bits|signed|f`);
    `config` has num_heads, num_blocks, decode_margin, rounding, layer_norm_eps."""

    def __init__(self, arrays: Mapping[str, np.ndarray], config: Mapping):
        self.config = dict(config)
        self.rounding = self.config["rounding"]
        self.num_heads = int(self.config["num_heads"])
        self.grids = export_format.grids_of(arrays)
        # integers held in floats: weights (<= 16 bits) exactly in float32; a bias in float32
        # when accumulator + bias provably stays below 2^24 (then the add is exact), else float64
        self.ints = {k: v.astype(np.float32) for k, v in arrays.items()
                     if v.dtype.kind in "iu" and not k.endswith(export_format.GRID_FIELDS)}
        for key in [k for k in self.ints if k.endswith("/bias")]:
            names = site_names.dense(key.removesuffix("/bias"))
            bound = accumulation.accumulator_bound(self.ints[names.weight].shape[0], self.grids[names.input],
                                      self.grids[names.weight])
            self.ints[key] = arrays[key].astype(accumulation.bias_dtype(bound, arrays[key]))
        # floats (LayerNorm) as float32
        self.floats = {k: v.astype(np.float32) for k, v in arrays.items() if v.dtype.kind == "f"}
        self.trace: list[MatmulRecord] | None = None
        self.observe = True  # track each accumulator's largest magnitude (accumulator_stats)
        self.manifest: dict | None = None  # set by load()
        self._acc_max: dict[str, int] = {}
        self._plans: dict[tuple[str, str, int], tuple[int, type, np.ndarray, str]] = {}
        if site_names.EMBEDDING in self.ints:
            self.vocab, self.d_model = self.ints[site_names.EMBEDDING].shape
            if not self.config.get("integer_only"):  # the float lookup (integer-only: a table)
                scale = self._scale(site_names.EMBEDDING).astype(np.float32)
                self.table = self.ints[site_names.EMBEDDING] * scale

    def token_format(self) -> dict:
        """bits, signed and f of a token id (unsigned, enough bits for the vocabulary)."""
        return {"bits": max(int(self.vocab - 1).bit_length(), 1), "signed": False, "f": 0}

    def site_format(self, site: str) -> dict:
        """bits, signed and f of a site's grid (how golden vectors and the data sheet name a tensor's
        format)."""
        grid = self.grids[site]
        return {"bits": grid.bits, "signed": grid.signed, "f": grid.f.tolist()}

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
        acc = accumulation.gemm(x[..., :chunk], w_mat[..., :chunk, :], dtype)
        for lo in range(chunk, k, chunk):
            part = accumulation.gemm(x[..., lo:lo + chunk], w_mat[..., lo:lo + chunk, :])
            acc = acc.astype(np.float64) + part
        return acc, scale

    def record_matmul(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray, acc: np.ndarray,
                      transpose_w: bool) -> None:
        """Track the accumulator's largest magnitude (while `observe`) and, while tracing, the call."""
        name = site_names.matmul_of(x_site)
        if self.observe:
            self._observe(name, acc)
        if self.trace is not None:
            w_mat = np.swapaxes(w, -1, -2) if transpose_w else w
            bound = float(np.matmul(np.abs(x), np.abs(w_mat)).max(initial=0.0))
            self.trace.append(MatmulRecord(name, x_site, x, w_site, w, acc.astype(np.float64), bound,
                                           transpose_w))

    def _plan(self, x_site: str, w_site: str, k: int) -> tuple[int, type, np.ndarray, str]:
        """How a K-term matmul of these sites runs, worked out once: float32 BLAS is exact while
        |every partial sum| < 2^24, so K is cut into chunks that keep below it and (when there
        is more than one) the chunk sums are added in float64; when one product can pass 2^24
        (wide operands) the GEMM runs in float64 (exact below 2^53, `check_exact`).
        Returns (chunk, dtype of the first chunk, 2^-(f_x + f_w), matmul name)."""
        key = (x_site, w_site, k)
        if key not in self._plans:
            gx, gw = self.grids[x_site], self.grids[w_site]
            accumulation.check_exact(k, gx, gw)
            product = accumulation.accumulator_bound(1, gx, gw)
            chunk = (accumulation.FLOAT32_EXACT - 1) // product or k
            dtype = np.float32 if chunk * product < accumulation.FLOAT32_EXACT else np.float64
            self._plans[key] = (chunk, dtype, np.exp2(-(gx.f + gw.output_f)), site_names.matmul_of(x_site))
        return self._plans[key]

    def _observe(self, name: str, acc: np.ndarray, register_bits: int | None = 32) -> None:
        """Track max |acc| per matmul (or reduction); warn once on stderr when it needs more than
        `register_bits` (None: wide by design, e.g. LayerNorm's variance)."""
        largest = int(max(acc.max(initial=0.0), -acc.min(initial=0.0)))
        if largest <= self._acc_max.get(name, -1):
            return
        self._acc_max[name] = largest
        if register_bits and accumulation.signed_bits(largest) > register_bits:
            print(f"warning: {name} accumulator reached {largest} ({accumulation.signed_bits(largest)} bits "
                  f"> {register_bits})", file=sys.stderr)

    def accumulator_stats(self) -> dict[str, dict[str, int]]:
        """{matmul: {"max_abs": largest |accumulator| seen, "bits": two's-complement bits}}."""
        return {name: {"max_abs": m, "bits": accumulation.signed_bits(m)}
                for name, m in self._acc_max.items()}

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
        names = site_names.dense(prefix)
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
        names = site_names.attention(prefix)
        k, v = self.dense(names.wk, memory), self.dense(names.wv, memory)
        # contiguous copies: every later decoder step multiplies by them
        return (np.ascontiguousarray(self.quantize(names.key, self.split_heads(k))),
                np.ascontiguousarray(self.quantize(names.value, self.split_heads(v))))

    def attend(self, prefix: str, x: np.ndarray, k: np.ndarray, v: np.ndarray,
               bias: np.ndarray) -> np.ndarray:
        """float_ops.softmax(Q(q) k^T / sqrt(d_k) + bias) -> Q(P) v, heads concatenated, W^O; k and v are
        integers from project_kv."""
        names = site_names.attention(prefix)
        q = self.split_heads(self.dense(names.wq, x))
        logits = self.matmul(names.query, self.quantize(names.query, q), names.key, k, transpose_w=True)
        d_k = q.shape[-1]
        probs = float_ops.softmax(logits * np.float32(1.0 / math.sqrt(d_k)) + bias)
        heads = self.matmul(names.probs, self.quantize(names.probs, probs), names.value, v)
        b, _, lq, _ = heads.shape
        return self.dense(names.wo, heads.transpose(0, 2, 1, 3).reshape(b, lq, -1))

    def attention(self, prefix: str, x: np.ndarray, memory: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return self.attend(prefix, x, *self.project_kv(prefix, memory), bias)

    def ffn(self, prefix: str, x: np.ndarray) -> np.ndarray:
        """dense2(Q_unsigned(max(0, dense1(x))))."""
        names = site_names.feed_forward(prefix)
        return self.dense(names.dense2, np.maximum(self.dense(names.dense1, x), 0))

    def layer_norm(self, prefix: str, x: np.ndarray) -> np.ndarray:
        return float_ops.layer_norm(x, self.floats[f"{prefix}/gamma"], self.floats[f"{prefix}/beta"],
                          self.config["layer_norm_eps"])

    def embed(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
        """E_q[ids] * 2^-f * sqrt(d) + PE[offset : offset + L]."""
        pe = float_ops.positional_encoding(ids.shape[1], self.d_model, start=offset)
        return self.table[ids] * np.float32(math.sqrt(self.d_model)) + pe

    def logits(self, y: np.ndarray) -> np.ndarray:
        """Q(y) E_q^T: the output projection with the shared integer table."""
        site = site_names.OUTPUT_INPUT
        return self.matmul(site, self.quantize(site, y), site_names.EMBEDDING,
                           self.ints[site_names.EMBEDDING], transpose_w=True)

    # ---- the model --------------------------------------------------------------------------

    def encode(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Memory [B, Ls, d] and the source padding bias."""
        bias = float_ops.padding_bias(src)
        x = self.embed(src)
        for i in range(self.config["num_blocks"]):
            names = site_names.block_names("encoder", i)
            x = self.layer_norm(names.norms[0], x + self.attention(names.self_attention, x, x, bias))
            x = self.layer_norm(names.norms[1], x + self.ffn(names.ffn, x))
        return x, bias

    def decoder_block(self, i: int, y: np.ndarray, self_kv: tuple, self_bias: np.ndarray,
                      cross_kv: tuple, src_bias: np.ndarray) -> np.ndarray:
        names = site_names.block_names("decoder", i)
        ln1, ln2, ln3 = names.norms
        y = self.layer_norm(ln1, y + self.attend(names.self_attention, y, *self_kv, self_bias))
        y = self.layer_norm(ln2, y + self.attend(names.cross_attention, y, *cross_kv, src_bias))
        return self.layer_norm(ln3, y + self.ffn(names.ffn, y))

    def decode(self, tgt_in: np.ndarray, memory: np.ndarray, src_bias: np.ndarray) -> np.ndarray:
        """Teacher-forced decoder over a whole prefix: logits [B, Lt, V]."""
        y = self.embed(tgt_in)
        self_bias = float_ops.causal_bias(tgt_in.shape[1]) + float_ops.padding_bias(tgt_in)  # as model.decode
        for i in range(self.config["num_blocks"]):
            names = site_names.block_names("decoder", i)
            self_kv = self.project_kv(names.self_attention, y)
            cross_kv = self.project_kv(names.cross_attention, memory)
            y = self.decoder_block(i, y, self_kv, self_bias, cross_kv, src_bias)
        return self.logits(y)

    def forward(self, src: np.ndarray, tgt_in: np.ndarray) -> np.ndarray:
        """Teacher-forced logits [B, Lt, V] for int sources [B, Ls] and decoder inputs [B, Lt]."""
        memory, src_bias = self.encode(np.asarray(src))
        return self.decode(np.asarray(tgt_in), memory, src_bias)

    # ---- decoding ---------------------------------------------------------------------------

    def step(self, token: np.ndarray, t: int, cache: list, cross_kv: list,
              src_bias: np.ndarray) -> np.ndarray:
        """One cached decoder step at position t: logits [N, V]; writes keys/values at t into
        `cache`.  model.Transformer._step attends over the whole cache with the positions
        after t masked (-1e9: probability exactly 0, so they add nothing to P V); here the
        step attends over positions 0..t only, which gives the same values."""
        y = self.embed(token[:, None], offset=t)
        no_mask = np.float32(0.0)
        for i, ((k, v), kv) in enumerate(zip(cache, cross_kv)):
            k_t, v_t = self.project_kv(site_names.block_names("decoder", i).self_attention, y)
            k[:, :, t], v[:, :, t] = k_t[:, :, 0], v_t[:, :, 0]
            y = self.decoder_block(i, y, (k[:, :, :t + 1], v[:, :, :t + 1]), no_mask, kv, src_bias)
        return self.logits(y)[:, 0]

    def logit_values(self, logits: np.ndarray) -> np.ndarray:
        """The logits as real values, for ranking beam hypotheses (here already float32)."""
        return logits

    def start_decoding(self, src: np.ndarray, beam: int) -> tuple:
        """Encoder pass and per-row decoding state, each source row repeated `beam` times:
        (source bias, output limit per row, cross-attention K/V per block, empty K/V cache)."""
        memory, src_bias = self.encode(src)
        memory, src_bias = np.repeat(memory, beam, 0), np.repeat(src_bias, beam, 0)
        # at most (non-pad source tokens + decode_margin) outputs per sentence
        limit = np.repeat((src != PAD).sum(axis=1) + self.config["decode_margin"], beam)
        cross_kv = [self.cross_kv(site_names.block_names("decoder", i).cross_attention, memory)
                    for i in range(self.config["num_blocks"])]
        shape = (len(limit), self.num_heads, int(limit.max()), self.d_model // self.num_heads)
        cache = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                 for _ in range(self.config["num_blocks"])]
        return src_bias, limit, cross_kv, cache

    def cross_kv(self, prefix: str, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A decoder block's cross-attention K and V of the encoder memory."""
        return self.project_kv(prefix, memory)
