"""No float arithmetic on the integer-only engine's path (docs/integer_only.md, "The integer-only engine
and its export"): a whole teacher-forced forward and a greedy decode, traced.

Two detectors, as tests/test_int_layer_norm.py has for LayerNorm alone:
- every integer array on the path is an `IntOnly` (an ndarray subclass): the engine's inputs, its
  integer tables, every op's output (`emit`) and every array a kernel takes (`kernels._int64`,
  `kernels._lane`); their descendants stay IntOnly, and any ufunc with a float operand or result, or
  any float descendant (astype, a division, np.mean, ...), inline temporaries included, is recorded;
- every local of every frame of the engine and the kernels, at every line and return, is checked
  for floats (Python floats included), beside the GEMM carrier's own locals.

The one documented exception is the carrier of the GEMMs: `accumulate` hands integer operands held in
float32 (or float64) to `accumulation.gemm`, and the sums come back as integers at once. The carrier
is checked instead: called from `accumulate` only, float32/float64, integer operands, integer sums."""

from __future__ import annotations

import os
import sys

import no_float
import numpy as np
import pytest
from test_int import calibrated_model, demo_spm, random_src

from integer import accumulation, decoding, intonly_engine, kernels, loader, matmul_engine, token_ids
from integer_tf import export

PRESETS = {"w8a8": dict(wbits=8, abits=8),
           "w4a8_per_row_embedding": dict(wbits=4, abits=8, per_row_embedding=True)}
ENGINE_FILES = {os.path.abspath(m.__file__) for m in (intonly_engine, kernels, matmul_engine, decoding)}
# the carrier itself (frames not traced): accumulate, and _plan, which works out its chunks, dtype
# and the scale 2^-(f_x + f_w) that the integer-only engine drops
CARRIER_FRAMES = {"accumulate", "_plan"}
# the locals that hold the carrier's operands outside it, each a float32 array (or a tuple of them) of
# exact integers (checked): the keys and values (project_kv's heads, attend's k and v, the decoder's
# self_kv / cross_kv, the cached step's k, v and kv, greedy dropping finished rows from the cache) and
# the weights (imatmul's w, which record_matmul receives)
CARRIER_LOCALS = {("attend", "k"), ("attend", "v"), ("imatmul", "w"), ("record_matmul", "w"),
                  ("project_kv", "heads"), ("project_kv", "<return>"), ("decode", "self_kv"),
                  ("decode", "cross_kv"), ("decoder_block", "self_kv"), ("decoder_block", "cross_kv"),
                  ("step", "k"), ("step", "v"), ("step", "k_t"), ("step", "v_t"), ("step", "kv"),
                  ("cross_kv", "<return>"), ("<listcomp>", "k"), ("<listcomp>", "v"), ("greedy", "k"),
                  ("greedy", "v")}  # greedy: [(k[going], v[going]) for k, v in cache], inlined from 3.12


class IntOnly(np.ndarray):
    """An integer array whose descendants stay IntOnly; float arithmetic on it is recorded in `seen`."""

    seen: list[str] = []
    reached: set[str] = set()  # file:function of the engine or kernel code that computed on IntOnly arrays

    def __array_finalize__(self, obj):
        if self.dtype.kind not in "iub":
            record(f"a {self.dtype} array")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        IntOnly.reached.add(where().rsplit(":", 1)[0])
        result = getattr(ufunc, method)(*plain(inputs), **plain(kwargs))
        results = result if isinstance(result, tuple) else (result,)
        operands = inputs + tuple(kwargs.get("out", ())) + results
        if any(is_float(x) for x in operands):
            record(f"np.{ufunc.__name__}.{method} ({', '.join(describe(x) for x in operands)})")
        return int_only(result)

    def __array_function__(self, func, types, args, kwargs):
        IntOnly.reached.add(where().rsplit(":", 1)[0])
        return int_only(func(*plain(args), **plain(kwargs)))


def is_float(x) -> bool:
    return isinstance(x, float | complex | np.inexact) or (isinstance(x, np.ndarray) and x.dtype.kind in "fc")


def is_carrier(x) -> bool:
    """A GEMM operand held in float32: integers exactly."""
    return isinstance(x, np.ndarray) and x.dtype == np.float32 and bool(np.all(x == np.rint(x)))


def describe(x) -> str:
    return str(x.dtype) if isinstance(x, np.ndarray | np.generic) else type(x).__name__


def where() -> str:
    """The innermost frame of the engine or the kernels on the stack: file:function:line."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) not in ENGINE_FILES:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}:{frame.f_lineno}"


def record(what: str) -> None:
    IntOnly.seen.append(f"{what} at {where()}")


def plain(x):
    return no_float.plain(x, IntOnly)


def int_only(x):
    return no_float.traced(x, IntOnly, lambda v: record(f"a {type(v).__name__} scalar"))


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return demo_spm(str(tmp_path_factory.mktemp("spm")))[0]


@pytest.fixture(scope="module", params=list(PRESETS))
def engine(request, spm_file, tmp_path_factory):
    """A tiny calibrated integer-only model, exported and loaded: its IntOnlyTransformer."""
    model, hp = calibrated_model(spm_file, integer_only=True, **PRESETS[request.param])
    out = str(tmp_path_factory.mktemp("intonly_no_float") / request.param)
    sources = [list(token_ids.strip_ids(r)) for r in random_src(model.vocab_size, 6, 9, seed=21)]
    export.export_model(model, hp, spm_file, out, sources=sources)
    engine = loader.load_engine(out)
    assert type(engine) is intonly_engine.IntOnlyTransformer
    return engine


@pytest.fixture
def traced(engine, monkeypatch):
    """The engine with every integer on its path IntOnly and the GEMM carrier checked: (engine, the
    carrier's calls, the float locals the frame tracer found, run(fn, *args): fn under the tracer)."""
    IntOnly.seen, IntOnly.reached = [], set()
    calls = []
    real_gemm, real_int64, real_lane, real_emit = (accumulation.gemm, kernels._int64, kernels._lane,
                                                   engine.emit)

    def carrier(x, w, dtype=np.float32):
        caller = sys._getframe(1).f_code.co_name
        x, w = plain(x), plain(w)
        acc = real_gemm(x, w, dtype)
        exact = all(a.dtype.kind in "iu" or bool(np.all(a == np.rint(a))) for a in (x, w, acc))
        calls.append((caller, np.dtype(dtype).name, acc.dtype.name, exact))
        return acc

    def emit(name, kind, result, *args, **params):
        return real_emit(name, kind, result, *args, **params).view(IntOnly)

    monkeypatch.setattr(accumulation, "gemm", carrier)
    monkeypatch.setattr(kernels, "_int64", lambda a: real_int64(a).view(IntOnly))
    monkeypatch.setattr(kernels, "_lane", lambda a: real_lane(a).view(IntOnly))
    monkeypatch.setattr(engine, "emit", emit)
    monkeypatch.setattr(engine, "int64", {k: v.view(IntOnly) for k, v in engine.int64.items()})
    floats = []

    def tracer(frame, event, arg):
        if os.path.abspath(frame.f_code.co_filename) not in ENGINE_FILES:
            return None
        if frame.f_code.co_name in CARRIER_FRAMES:
            return None

        def local(frame, event, arg):
            values = list(frame.f_locals.items()) + ([("<return>", arg)] if event == "return" else [])
            name = frame.f_code.co_name
            for key, value in values:
                inner = value if isinstance(value, tuple | list) else (value,)
                if not any(is_float(v) for v in inner):
                    continue
                if (name, key) not in CARRIER_LOCALS or not all(is_carrier(v) for v in inner):
                    floats.append(f"{key} in {name}:{frame.f_lineno} " + ",".join(describe(v) for v in inner))
            return local
        return local

    def run(fn, *args):
        sys.settrace(tracer)
        try:
            return fn(*args)
        finally:
            sys.settrace(None)

    return engine, calls, floats, run


def inputs(vocab):
    src = random_src(vocab, 6, 9, seed=7)
    tgt = random_src(vocab, 6, 8, seed=8)
    tgt_in = np.concatenate([np.full((6, 1), token_ids.BOS), tgt[:, :-1]], axis=1).astype(np.int32)
    return src.view(IntOnly), tgt_in.view(IntOnly)


def check_clean(calls, floats):
    assert not IntOnly.seen, IntOnly.seen[:8]
    assert not floats, sorted({(f.split(" in ")[1].split(":")[0], f.split(" ")[0]) for f in floats})
    assert calls, "no GEMM ran through the carrier"
    bad = [c for c in calls if c[0] != "accumulate" or c[1] not in ("float32", "float64")
           or c[2] not in ("float32", "float64") or not c[3]]
    assert not bad, bad[:5]


def test_the_detector_sees_a_float_temporary():
    IntOnly.seen = []
    x = np.arange(4).view(IntOnly)
    y = (x / x.sum() * 256).astype(np.int64)  # a float normalization cast back: integers out
    assert y.dtype == np.int64
    assert any("np.divide" in s for s in IntOnly.seen), IntOnly.seen


def test_whole_forward_and_greedy_decode_compute_no_float(traced):
    engine, calls, floats, run = traced
    src, tgt_in = inputs(engine.vocab)
    with engine.tracing_ops() as ops:
        logits = run(engine.forward, src, tgt_in)
    assert isinstance(logits, IntOnly) and logits.dtype.kind == "i"
    assert {op.kind for op in ops} >= {"embedding_sum", "requantize", "matmul", "relu", "residual",
                                       "layer_norm", "softmax"}
    softmax_probs = [op.output for op in ops if op.kind == "softmax"]
    assert softmax_probs and all(isinstance(p, IntOnly) for p in softmax_probs)
    # the detector reached inside: the kernels and the engine's own integer code computed on IntOnly
    assert IntOnly.reached >= {"kernels.py:layer_norm", "kernels.py:_exp_neg", "kernels.py:softmax_with_sums",
                               "kernels.py:_div_round", "kernels.py:requantize", "intonly_engine.py:embed",
                               "intonly_engine.py:add_norm", "intonly_engine.py:imatmul"}, IntOnly.reached
    check_clean(calls, floats)
    n_forward = len(calls)
    with engine.tracing_ops() as ops:
        tokens = run(decoding.greedy, engine, src[:3])
    assert tokens.shape[0] == 3 and any(op.kind == "softmax" for op in ops)
    assert len(calls) > n_forward  # the decoder steps' GEMMs went through the carrier too
    check_clean(calls, floats)


@pytest.mark.parametrize("engine", ["w8a8"], indirect=True)
def test_a_float_normalization_cast_back_to_integers_is_caught(traced, monkeypatch):
    """The softmax normalized in float64 and cast back to int64: every op's output is still an
    integer (emit passes it), but the traced forward sees the division."""
    engine, calls, floats, run = traced

    def float_normalize(e, total, out_bits, rounding):
        return (e / np.maximum(total, 1) * 2**out_bits).astype(np.int64)

    monkeypatch.setattr(kernels, "_normalize", float_normalize)
    src, tgt_in = inputs(engine.vocab)
    run(engine.forward, src, tgt_in)
    where = "kernels.py:softmax_with_sums"  # the engine's call of the kernel
    assert any("np.divide" in s and where in s for s in IntOnly.seen), IntOnly.seen[:5]
    IntOnly.seen = []
