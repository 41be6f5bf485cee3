"""The integer-only engine: from token ids to the greedy argmax every tensor is an integer on a
power-of-two grid; between the matmuls the kernels of integer/kernels.py (docs/integer_only.md)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from integer import accumulation, export_format, kernels, site_names
from integer.matmul_engine import IntTransformer
from integer.token_ids import PAD


@dataclass
class OpRecord:
    """One integer op of the integer-only path while tracing, in execution order: its name (the
    site it writes, or the matmul, or `<dense1>/relu`; unique within one forward pass), its kind,
    its integer inputs and output, `sources` (input tag -> the name of the op that produced it;
    absent for the token ids, the mask and the export's own arrays), `params` (the static
    arguments that reproduce it: grids, shifts, rounding, the export arrays it reads, and `out`,
    the output's bits, signedness and f) and `steps` (a kernel's intermediates)."""

    name: str
    kind: str
    inputs: dict[str, np.ndarray]
    output: np.ndarray
    sources: dict[str, str] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    steps: dict[str, np.ndarray] = field(default_factory=dict)


class IntOnlyTransformer(IntTransformer):
    """The engine of an integer-only export: from token ids to the greedy argmax every tensor is an
    int64 array on a power-of-two grid, every rescale a shift (integer/kernels.py), every kernel integer.

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
                      if v.dtype.kind in "iu" and not k.endswith(export_format.GRID_FIELDS)}
        self.d_k = self.d_model // self.num_heads
        self.ops: list[OpRecord] | None = None  # while tracing
        self._edges: dict[tuple[str, str], tuple[object, str]] = {}
        self._bounds: dict[str, int] = {}  # proven max |value| of each matmul and reduction
        self._kernel_bounds: dict[str, dict[str, int]] = {}  # per LayerNorm and attention: the kernel's
        # the reductions (LayerNorm variance, softmax and residual sums) are observed too; the
        # export's data sheet and eval turn observing on, plain decoding does not pay for it
        self.observe = False
        self.max_positions = len(self.int64[f"{site_names.EMBEDDING_SUM}/positions"])
        self.normalization = self.config.get("normalization", "exact")
        if self.normalization not in kernels.NORMALIZATIONS:
            known = ", ".join(kernels.NORMALIZATIONS)
            raise export_format.ExportError(f"the export's normalization {self.normalization!r} is not this "
                                            f"engine's (integer/kernels.py: {known})")
        for key, value in kernels.intonly_constants(self.d_k, self.normalization).items():
            if key in self.config and self.config[key] != value:
                raise export_format.ExportError(f"the export's {key} {self.config[key]} is not this "
                                                f"engine's kernels' {value} (integer/kernels.py)")

    # ---- integers in, integers out -----------------------------------------------------------

    def emit(self, name: str, kind: str, result: np.ndarray, inputs: dict[str, np.ndarray] | None = None,
             sources: dict[str, str] | None = None, steps: dict | None = None, **params) -> np.ndarray:
        """Every op's result passes here: an integer array, or TypeError (a float on the path).
        While tracing, the op is recorded (OpRecord) with its inputs, sources, params and steps."""
        if result.dtype.kind not in "iub":
            raise TypeError(f"{kind} {name} produced {result.dtype} on the integer-only path")
        if self.ops is not None:
            self.ops.append(OpRecord(name, kind, inputs or {}, result, sources or {}, params, steps or {}))
        return result

    def steps(self) -> dict | None:
        """A dict for a kernel's intermediates while tracing, else None (the kernels skip them)."""
        return {} if self.ops is not None else None

    def accumulator_format(self, name: str, f, signed: bool = True) -> dict:
        """bits (proven), signedness and f of an accumulator (or a reduction) `name`."""
        bits = accumulation.signed_bits(self._bounds[name]) - (0 if signed else 1)
        return {"bits": bits, "signed": signed, "f": np.asarray(f).tolist(),
                "proven_max_abs": self._bounds[name]}

    def f(self, site: str) -> np.ndarray:
        return self.grids[site].f

    def requantize(self, q: np.ndarray, f_from, source: str, site: str) -> np.ndarray:
        """clip(R(q 2^(f_site - f_from))): the edge source -> site, a shift (left when finer)."""
        grid = self.grids[site]
        shift = np.asarray(f_from) - grid.f
        self._edges[(source, site)] = (shift, self.rounding)
        out = kernels.requantize(q, shift, grid.bits, grid.signed, self.rounding)
        if self.ops is None:  # decoding: no record to describe
            return self.emit(site, "requantize", out)
        return self.emit(site, "requantize", out, {"q": q}, {"q": source}, shift=shift.tolist(),
                         rounding=self.rounding, out=self.site_format(site))

    def imatmul(self, x_site: str, x: np.ndarray, w_site: str, w: np.ndarray,
                bias_key: str | None = None, transpose_w: bool = False,
                k_max: int | None = None) -> np.ndarray:
        """acc = x @ w (+ the bias `bias_key`, if the export has it) on the grid f_x + f_w, int32
        when its proven bound K max|x| max|w| + max|b| (K = k_max, the longest sequence, or the
        contracted length) is below 2^30 (a 32-bit lane, kernels.shift_round keeps it), else int64."""
        name = site_names.matmul_of(x_site)
        bias = self.int64.get(bias_key) if bias_key else None
        if name not in self._bounds:
            largest_bias = 0 if bias is None else int(np.abs(bias).max(initial=0))
            k = k_max or x.shape[-1]
            bound = accumulation.accumulator_bound(k, self.grids[x_site], self.grids[w_site])
            self._bounds[name] = bound + largest_bias
        lane = np.int32 if self._bounds[name] < 1 << 30 else np.int64
        acc = self.accumulate(x_site, x, w_site, w, transpose_w)[0].astype(lane)
        if bias is not None:
            acc += bias.astype(lane)  # exact: the bound includes the bias
        self.record_matmul(x_site, x, w_site, w, acc, transpose_w)
        if self.ops is None:
            return self.emit(name, "matmul", acc)
        weight = w_site in self.ints and w is self.ints[w_site]  # an export array, not an activation
        inputs, sources = {"x": x}, {"x": x_site}
        if not weight:
            inputs["w"], sources["w"] = w.astype(np.int64), w_site
        f_acc = self.f(x_site) + self.grids[w_site].output_f
        return self.emit(name, "matmul", acc, inputs, sources, x_site=x_site, w_site=w_site,
                         weight=w_site if weight else None, bias=bias_key if bias is not None else None,
                         transpose_w=transpose_w, out=self.accumulator_format(name, f_acc))

    def dense(self, prefix: str, x: np.ndarray, f_x, source: str) -> tuple[np.ndarray, np.ndarray]:
        """(acc, f_acc): acc = Q(x) W_q + b_q on the grid f_acc = f_x + f_w."""
        names = site_names.dense(prefix)
        q = self.requantize(x, f_x, source, names.input)
        acc = self.imatmul(names.input, q, names.weight, self.ints[names.weight], names.bias)
        return acc, self.f(names.input) + self.f(names.weight)

    # ---- layers -----------------------------------------------------------------------------

    def embed(self, ids: np.ndarray, offset: int = 0) -> np.ndarray:
        """x_0 = clip(L[ids] + P[offset : offset + len]) on the embedding-sum grid."""
        positions = self.int64[f"{site_names.EMBEDDING_SUM}/positions"]
        end = offset + ids.shape[1]
        if end > len(positions):
            raise ValueError(f"a sequence of {end} positions is longer than the export's position "
                             f"table ({len(positions)}): re-export with a larger --max_positions")
        total = self.int64[f"{site_names.EMBEDDING_SUM}/lookup"][ids] + positions[offset:end]
        grid = self.grids[site_names.EMBEDDING_SUM]
        total = kernels.clip_to(total, grid.bits, grid.signed)
        if self.ops is None:
            return self.emit(site_names.EMBEDDING_SUM, "embedding_sum", total)
        return self.emit(site_names.EMBEDDING_SUM, "embedding_sum", total, {"ids": ids}, offset=offset,
                         input_formats={"ids": self.token_format()},
                         lookup=f"{site_names.EMBEDDING_SUM}/lookup",
                         positions=f"{site_names.EMBEDDING_SUM}/positions",
                         out=self.site_format(site_names.EMBEDDING_SUM))

    def add_norm(self, prefix: str, x: np.ndarray, x_source: str, a: np.ndarray, f_a, a_source: str
                 ) -> np.ndarray:
        """LN(x + a): x on the grid of site x_source, a the accumulator a_source on f_a; the sum
        exact on the finer grid g, requantized onto `<ln>/input`, then kernels.layer_norm onto
        `<ln>/output`."""
        names = site_names.layer_norm(prefix)
        f_x, grid = self.f(x_source), self.grids[names.input]
        g = np.maximum(f_x, f_a)
        total = kernels.shift_round(x, f_x - g, "floor")  # fresh int64: the add in place
        total += kernels.shift_round(a, f_a - g, "floor")
        if f"{prefix}/residual_sum" not in self._bounds:
            self._bounds[f"{prefix}/residual_sum"] = int(np.max(
                (self.grids[x_source].max_abs << (g - f_x)) + (self._bounds[a_source] << (g - f_a))))
        if self.observe:
            self._observe(f"{prefix}/residual_sum", total, None)
        # each operand's total shift onto the residual grid; the sum is rounded once
        self._edges[(x_source, names.input)] = (f_x - grid.f, self.rounding)
        self._edges[(a_source, names.input)] = (np.asarray(f_a) - grid.f, self.rounding)
        r = kernels.requantize(total, g - grid.f, grid.bits, grid.signed, self.rounding)
        if self.ops is None:
            r = self.emit(names.input, "residual", r)
        else:
            r = self.emit(names.input, "residual", r, {"x": x, "a": a}, {"x": x_source, "a": a_source},
                          x_shift=(g - f_x).tolist(), a_shift=(g - np.asarray(f_a)).tolist(),
                          shift=(g - grid.f).tolist(), rounding=self.rounding,
                          out=self.site_format(names.input),
                          sum=self.accumulator_format(f"{prefix}/residual_sum", g))
        out_grid, f_gamma = self.grids[names.output], int(self.f(names.gamma))
        beta, eps_q = self.int64[names.beta], self.int64[f"{prefix}/eps_q"]
        d = r.shape[-1]
        if prefix not in self._kernel_bounds:  # the proven widths of its intermediates, once
            self._kernel_bounds[prefix] = kernels.layer_norm_bounds(
                d, grid.bits, self.grids[names.gamma].max_abs, int(np.abs(beta).max(initial=0)), int(eps_q),
                out_grid.bits, normalization=self.normalization)
            self._bounds[f"{prefix}/variance"] = self._kernel_bounds[prefix]["W"]
        if self.observe:
            self._observe(f"{prefix}/variance", kernels.layer_norm_moments(r, eps_q)[1], None)
        # the output shift: from gamma n + beta on f_gamma + F onto the output site
        out_shift = f_gamma + kernels.LN_F - out_grid.f
        self._edges[(f"{prefix}/layer_norm", names.output)] = (out_shift, self.rounding)
        steps = self.steps()
        out = kernels.layer_norm(r, self.int64[names.gamma], beta, eps_q, f_gamma, int(out_grid.f),
                                 out_grid.bits, self.rounding, steps=steps, normalization=self.normalization)
        if steps is None:
            return self.emit(names.output, "layer_norm", out, {"input": r})
        return self.emit(names.output, "layer_norm", out, {"input": r}, {"input": names.input}, steps,
                         gamma=names.gamma, beta=names.beta, eps_q=f"{prefix}/eps_q", f_gamma=f_gamma,
                         f_in=int(grid.f), K=kernels.LN_K, F=kernels.LN_F, rounding=self.rounding,
                         normalization=self.normalization, out=self.site_format(names.output),
                         proven_max_abs=self._kernel_bounds[prefix])

    def project_kv(self, prefix: str, x: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        """K and V heads on the key/value grids, held in float32 as GEMM operands (exact)."""
        names = site_names.attention(prefix)
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
        names = site_names.attention(prefix)
        acc, f_acc = self.dense(names.wq, x, self.f(source), source)
        q = self.split_heads(self.requantize(acc, f_acc, names.wq, names.query))
        scores = self.imatmul(names.query, q, names.key, k, transpose_w=True)
        f_s = int(self.f(names.query) + self.f(names.key))
        probs_grid = self.grids[names.probs]
        self._edges[(site_names.matmul_of(names.query), f"{prefix}/softmax")] = (
            f_s - kernels.EXP_F, kernels.EXP_ROUNDING)
        mask = None if visible is None else np.broadcast_to(visible, scores.shape)
        steps = self.steps()
        probs, sums = kernels.softmax_with_sums(scores, f_s, mask, probs_grid.bits, self.rounding,
                                                m=self.d_k, steps=steps, normalization=self.normalization)
        if prefix not in self._kernel_bounds:
            self._kernel_bounds[prefix] = kernels.softmax_bounds(
                self._bounds[names.scores], f_s, self.max_positions, probs_grid.bits, m=self.d_k,
                normalization=self.normalization)
            self._bounds[f"{prefix}/softmax_sum"] = self._kernel_bounds[prefix]["S"]
        if self.observe:
            self._observe(f"{prefix}/softmax_sum", sums, None)
        inputs = {"scores": scores, "visible": np.broadcast_to(True, scores.shape) if mask is None else mask}
        if steps is None:
            probs = self.emit(names.probs, "softmax", probs, inputs)
        else:
            constants = list(kernels.exp_constants(kernels.EXP_F, self.d_k))
            probs = self.emit(names.probs, "softmax", probs, inputs, {"scores": names.scores}, steps, f=f_s,
                              m=self.d_k, F=kernels.EXP_F, constants=constants,
                              clamp=kernels.exp_clamp(f_s, self.d_k), exp_rounding=kernels.EXP_ROUNDING,
                              rounding=self.rounding, normalization=self.normalization,
                              out=self.site_format(names.probs),
                              proven_max_abs=self._kernel_bounds[prefix])
        heads = self.imatmul(names.probs, probs, names.value, v, k_max=self.max_positions)
        b, _, lq, _ = heads.shape
        concat = heads.transpose(0, 2, 1, 3).reshape(b, lq, -1)
        return self.dense(names.wo, concat, self.f(names.probs) + self.f(names.value),
                          site_names.matmul_of(names.probs))

    def ffn(self, prefix: str, x: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
        names = site_names.feed_forward(prefix)
        acc, f_acc = self.dense(names.dense1, x, self.f(source), source)
        out = self.accumulator_format(names.dense1, f_acc, signed=False) if self.ops is not None else None
        relu = self.emit(f"{names.dense1}/relu", "relu", np.maximum(acc, 0), {"acc": acc},
                         {"acc": names.dense1}, out=out)
        return self.dense(names.dense2, relu, f_acc, f"{names.dense1}/relu")

    def logits(self, y: np.ndarray, source: str) -> np.ndarray:
        """Integer logits Q(y) E_q^T on one grid, f_y + max(f_E) (`logit_frac_bits`), so that
        argmax compares integers: with a threshold per table row (--per_row_embedding) logit v
        is shifted left by max(f_E) - f_E[v], exact (int64)."""
        q = self.requantize(y, self.f(source), source, site_names.OUTPUT_INPUT)
        acc = self.imatmul(site_names.OUTPUT_INPUT, q, site_names.EMBEDDING, self.ints[site_names.EMBEDDING],
                           transpose_w=True)
        f_e = self.grids[site_names.EMBEDDING].output_f
        if f_e.ndim == 0:
            return acc
        shift = f_e.max() - f_e
        self._edges[(site_names.OUTPUT_PROJECTION, site_names.LOGITS)] = (-shift, self.rounding)  # exact
        aligned = acc.astype(np.int64) << shift
        if self.ops is None:
            return self.emit(site_names.LOGITS, "align", aligned)
        bound = self._bounds[site_names.OUTPUT_PROJECTION] << int(shift.max())
        return self.emit(site_names.LOGITS, "align", aligned, {"acc": acc},
                         {"acc": site_names.OUTPUT_PROJECTION}, shift=(-shift).tolist(),
                         out={"bits": accumulation.signed_bits(bound), "signed": True,
                              "f": self.logit_frac_bits, "proven_max_abs": bound})

    @property
    def logit_frac_bits(self) -> int:
        """f of the logits' grid: f_y + max(f_E)."""
        return int(self.f(site_names.OUTPUT_INPUT) + self.grids[site_names.EMBEDDING].output_f.max())

    def logit_values(self, logits: np.ndarray) -> np.ndarray:
        """Beam search ranks hypotheses by log-softmax in float64, outside the network."""
        return logits.astype(np.float64) * np.exp2(-np.float64(self.logit_frac_bits))

    # ---- the model --------------------------------------------------------------------------

    def _norm_output(self, side: str, i: int) -> str:
        """The site the input of block i (0-based) is on: the embedding sum or block i-1's output."""
        if i == 0:
            return site_names.EMBEDDING_SUM
        return site_names.layer_norm(site_names.block_names(side, i - 1).norms[-1]).output

    def encoder_block(self, i: int, x: np.ndarray, visible: np.ndarray) -> np.ndarray:
        names = site_names.block_names("encoder", i)
        source = self._norm_output("encoder", i)
        a, f_a = self.attention_over(names.self_attention, x, source, x, source, visible)
        x = self.add_norm(names.norms[0], x, source, a, f_a, site_names.attention(names.self_attention).wo)
        source = site_names.layer_norm(names.norms[0]).output
        a, f_a = self.ffn(names.ffn, x, source)
        return self.add_norm(names.norms[1], x, source, a, f_a, site_names.feed_forward(names.ffn).dense2)

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
        names = site_names.block_names("decoder", i)
        ln = [site_names.layer_norm(n).output for n in names.norms]
        source = self._norm_output("decoder", i)
        a, f_a = self.attend(names.self_attention, y, source, *self_kv, self_visible)
        y = self.add_norm(names.norms[0], y, source, a, f_a, site_names.attention(names.self_attention).wo)
        a, f_a = self.attend(names.cross_attention, y, ln[0], *cross_kv, src_visible)
        y = self.add_norm(names.norms[1], y, ln[0], a, f_a, site_names.attention(names.cross_attention).wo)
        a, f_a = self.ffn(names.ffn, y, ln[1])
        return self.add_norm(names.norms[2], y, ln[1], a, f_a, site_names.feed_forward(names.ffn).dense2)

    def decode(self, tgt_in: np.ndarray, memory: np.ndarray, src_visible: np.ndarray) -> np.ndarray:
        """Teacher-forced decoder over a whole prefix: integer logits [B, Lt, V]."""
        y = self.embed(tgt_in)
        length = tgt_in.shape[1]
        causal = np.tril(np.ones((length, length), bool))[None, None]
        self_visible = causal & (tgt_in != PAD)[:, None, None, :]
        for i in range(self.config["num_blocks"]):
            names = site_names.block_names("decoder", i)
            source = self._norm_output("decoder", i)
            self_kv = self.project_kv(names.self_attention, y, source)
            cross_kv = self.project_kv(names.cross_attention, memory, self.memory_source())
            y = self.decoder_block(i, y, self_kv, self_visible, cross_kv, src_visible)
        return self.logits(y, self._norm_output("decoder", self.config["num_blocks"]))

    def step(self, token: np.ndarray, t: int, cache: list, cross_kv: list,
              src_visible: np.ndarray) -> np.ndarray:
        """One cached decoder step at position t over keys 0..t (model.Transformer._step masks the
        later ones: the integer softmax gives them exactly 0). Integer logits [N, V]."""
        y = self.embed(token[:, None], offset=t)
        for i, ((k, v), kv) in enumerate(zip(cache, cross_kv)):
            prefix = site_names.block_names("decoder", i).self_attention
            k_t, v_t = self.project_kv(prefix, y, self._norm_output("decoder", i))
            k[:, :, t], v[:, :, t] = k_t[:, :, 0], v_t[:, :, 0]
            y = self.decoder_block(i, y, (k[:, :, :t + 1], v[:, :, :t + 1]), None, kv, src_visible)
        return self.logits(y, self._norm_output("decoder", self.config["num_blocks"]))[:, 0]

    def cross_kv(self, prefix: str, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K and V of the encoder memory, which lies on the last encoder norm's output grid (the
        base start_decoding does the rest; its source bias is here the key mask `visible`)."""
        return self.project_kv(prefix, memory, self.memory_source())

    def accumulator_stats(self) -> dict[str, dict[str, int]]:
        """Per matmul and reduction: the largest |value| seen and its bits, beside the proven
        bound (from the grids, the longest sequence `max_positions`) and its bits."""
        stats = super().accumulator_stats()
        for name, bound in self._bounds.items():
            stats.setdefault(name, {"max_abs": 0, "bits": 1})
            stats[name].update(proven_max_abs=int(bound), proven_bits=accumulation.signed_bits(int(bound)))
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
