"""Integer-only inference end to end (docs/integer_only.md): tiny integer-only W8A8 and W4A8 models,
calibrated and trained a few steps, exported and run by the NumPy engine, equal to the TF graph
integer for integer; no float on the engine's path; the float model untouched by the switch; the
export's data sheet; partial calibration from a matmul-only parent; surrogate gradients."""

from __future__ import annotations

import json
import math
import os
import shutil

import golden_replay
import numpy as np
import pytest
import tensorflow as tf
from test_int import calibrated_model, demo_spm, random_src, tiny_hp

import hparams
import modules
import runs
import train
from hw import golden, params
from integer import (
    calibration,
    datasheet,
    decoding,
    export_format,
    fixed_point,
    golden_vectors,
    intonly_engine,
    kernels,
    loader,
    site_names,
    token_ids,
)
from integer_tf import export, intonly_layers
from model import Transformer, load_weights

TRAIN_HP = dict(lr=1e-4, warmup_steps=4, th_lr=5e-2, th_decay_steps=1000)
TRAIN_STEPS = 8
PRESETS = {"w8a8": dict(wbits=8, abits=8),
           "w4a8_per_row_embedding": dict(wbits=4, abits=8, per_row_embedding=True),
           "w8a8_reciprocal": dict(wbits=8, abits=8, normalization="reciprocal")}


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    """A SentencePiece model on the demo corpus (as test_int.spm_file)."""
    return demo_spm(str(tmp_path_factory.mktemp("spm")))[0]


def training_batch(vocab, seed, batch=8):
    """(src, tgt): tgt = BOS + ids + EOS + padding, as model.loss reads it."""
    src = random_src(vocab, batch, 10, seed=seed)
    tgt = np.concatenate([np.full((batch, 1), token_ids.BOS), random_src(vocab, batch, 11, seed=100 + seed)],
                         axis=1).astype(np.int32)
    return src, tgt


def thresholds(model):
    """log2_t of every trainable site, by name."""
    return {name: site.log2_t.numpy().copy() for name, site in model.sites.sites.items()
            if isinstance(site.log2_t, tf.Variable)}


def grids(model):
    """The fractional bits f of every site, by name."""
    return {name: site.frac_bits() for name, site in model.sites.sites.items()}


def norm_prefixes(num_blocks=2):
    return [norm for side in ("encoder", "decoder") for i in range(num_blocks)
            for norm in site_names.block_names(side, i).norms]


def attention_prefixes(num_blocks=2):
    prefixes = []
    for side in ("encoder", "decoder"):
        for i in range(num_blocks):
            names = site_names.block_names(side, i)
            prefixes += [p for p in (names.self_attention, names.cross_attention) if p]
    return prefixes


def integer_only_sites(num_blocks=2):
    """The site names the integer-only layers record: the embedding sum, every LayerNorm's input
    (the requantized residual sum) and output, every softmax's output."""
    names = [site_names.EMBEDDING_SUM]
    for norm in norm_prefixes(num_blocks):
        names += [site_names.layer_norm(norm).input, site_names.layer_norm(norm).output]
    return set(names) | {site_names.attention(p).probs for p in attention_prefixes(num_blocks)}


def residual_sources(num_blocks=2):
    """{<ln>/input: {the skip site, the branch dense}}: the two grids every residual add joins."""
    sources = {}
    for side in ("encoder", "decoder"):
        skip = site_names.EMBEDDING_SUM
        for i in range(num_blocks):
            names = site_names.block_names(side, i)
            attentions = [p for p in (names.self_attention, names.cross_attention) if p]
            branches = [site_names.attention(p).wo for p in attentions]
            branches.append(site_names.feed_forward(names.ffn).dense2)
            for norm, branch in zip(names.norms, branches):
                sources[site_names.layer_norm(norm).input] = {skip, branch}
                skip = site_names.layer_norm(norm).output
    return sources


@pytest.fixture(scope="module", params=list(PRESETS))
def trained(request, spm_file, tmp_path_factory):
    """An integer-only model calibrated, trained TRAIN_STEPS Adam steps (weights and thresholds),
    exported and loaded: (model, hp, engine, manifest, export dir, (log2_t, f) before training)."""
    model, hp = calibrated_model(spm_file, integer_only=True, **PRESETS[request.param], **TRAIN_HP)
    before = thresholds(model), grids(model)
    opt = train.Optimizers(model, hp)
    step = train.make_train_step(model, tf.distribute.get_strategy(), opt, True)
    for s in range(TRAIN_STEPS):
        src, tgt = training_batch(model.vocab_size, s)
        n_tokens = float(np.count_nonzero(tgt[:, 1:] != token_ids.PAD))
        loss, _ = step(tf.constant(src), tf.constant(tgt), tf.constant(n_tokens, tf.float32))
        assert np.isfinite(loss.numpy())
    out = str(tmp_path_factory.mktemp("intonly") / request.param)
    sources = [list(token_ids.strip_ids(r)) for r in random_src(model.vocab_size, 6, 9, seed=21)]
    manifest = export.export_model(model, hp, spm_file, out, sources=sources)
    engine = loader.load_engine(out)
    return model, hp, engine, manifest, out, before


def teacher_forced_inputs(vocab):
    src = random_src(vocab, 6, 9, seed=7)
    tgt = random_src(vocab, 6, 8, seed=8)
    tgt_in = np.concatenate([np.full((6, 1), token_ids.BOS), tgt[:, :-1]], axis=1).astype(np.int32)
    return src, tgt_in


# ---- 1. the trained model: TF graph == NumPy engine, integer for integer ------------------------


def test_training_moved_the_thresholds(trained):
    model, _, engine, _, _, (before, f_before) = trained
    after = thresholds(model)
    assert after.keys() == before.keys()
    moved = [name for name in before if not np.array_equal(before[name], after[name])]
    assert len(moved) > len(before) // 2, moved
    # the integer-only sites train too: the embedding sum and the LayerNorms' thresholds
    assert site_names.EMBEDDING_SUM in moved
    assert any(name.endswith(("/ln1/input", "/ln2/input", "/ln3/input")) for name in moved)
    # and some grids changed (ceil(log2_t) crossed an integer): the export has the trained ones
    f_after = grids(model)
    changed = [name for name in f_before if not np.array_equal(f_before[name], f_after[name])]
    assert len(changed) >= 3, changed
    assert all(np.array_equal(engine.f(name), f_after[name]) for name in f_after)


def test_teacher_forced_sites_and_logits_equal_the_engine(trained):
    model, _, engine, _, _, _ = trained
    assert type(engine) is intonly_engine.IntOnlyTransformer
    src, tgt_in = teacher_forced_inputs(engine.vocab)
    model.sites.recorded = {}
    try:
        logits_tf = model(tf.constant(src), tf.constant(tgt_in)).numpy()
        recorded = model.sites.recorded
    finally:
        model.sites.recorded = None
    with engine.tracing_ops() as ops:
        logits_int = engine.forward(src, tgt_in)
    expected = integer_only_sites()
    assert set(recorded) == expected
    produced = {}
    for op in ops:
        if op.kind in ("embedding_sum", "residual", "layer_norm", "softmax"):
            produced.setdefault(op.name, []).append(op.output)
    assert set(produced) == expected
    for name in sorted(expected):
        calls = 2 if name == site_names.EMBEDDING_SUM else 1
        assert len(recorded[name]) == len(produced[name]) == calls, name
        for tf_q, np_q in zip(recorded[name], produced[name]):
            assert tf_q.dtype == np_q.dtype == np.int64, name
            assert tf_q.shape == np_q.shape, name
            n_diff = int(np.count_nonzero(tf_q != np_q))
            assert n_diff == 0, f"{name}: {n_diff} integers differ"
    # the probabilities are not all one-hot or uniform: the comparison means something
    probs = recorded[site_names.attention(site_names.block_names("decoder", 1).cross_attention).probs][0]
    assert len(np.unique(probs)) > 10
    # a 32-bit lane when the proven bound allows it (intonly_engine.IntOnlyTransformer.imatmul), int64
    # once a threshold per table row shifts the logits onto the finest row's grid
    proven = engine.accumulator_stats()[site_names.OUTPUT_PROJECTION]["proven_max_abs"]
    per_row = engine.f(site_names.EMBEDDING).ndim == 2
    assert per_row == model.sites.config.per_row_embedding
    assert logits_int.dtype == (np.int32 if proven < 2**30 and not per_row else np.int64)
    scaled = logits_tf.astype(np.float64) * 2.0**engine.logit_frac_bits
    np.testing.assert_array_equal(scaled, np.rint(scaled))  # TF's logits lie on the grid
    np.testing.assert_array_equal(scaled.astype(np.int64), logits_int)


def test_greedy_tokens_equal_the_engine(trained):
    model, _, engine, _, _, _ = trained
    src = random_src(engine.vocab, 8, 10, seed=11)
    greedy = decoding.greedy(engine, src)
    assert len({tuple(token_ids.strip_ids(r)) for r in greedy}) > 2, "degenerate test model"
    np.testing.assert_array_equal(greedy, model.greedy(tf.constant(src)).numpy())
    # finished sentences left the batch on the way (IntTransformer.greedy), the others went on
    assert len({len(token_ids.strip_ids(r)) for r in greedy}) > 1
    np.testing.assert_array_equal(greedy, decoding.beam_search(engine, src, 1))


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
def test_decoding_picks_the_layers_route_once(trained, monkeypatch):
    """Decoding decides the layers' float64-or-int64 routes once (IntegerOnlySites.decoding): no
    tf.cond inside the decoding loop, and the int64 branch, forced, decodes the engine's tokens too."""
    model, _, engine, _, _, _ = trained
    graph = model.greedy.get_concrete_function().graph.as_graph_def()
    loops = [fn for fn in graph.library.function if "while_body" in fn.signature.name]
    conds = [n for n in graph.node if n.op in ("If", "StatelessIf")]
    assert loops and len(conds) == 1
    assert not [n.name for fn in loops for n in fn.node_def if n.op in ("If", "StatelessIf")]
    src = random_src(engine.vocab, 8, 10, seed=11)
    never = lambda self: tf.constant(False)  # noqa: E731
    monkeypatch.setattr(intonly_layers.IntLayerNorm, "float64_route_fits", never)
    monkeypatch.setattr(intonly_layers.IntSoftmax, "float64_route_fits", never)
    int64_greedy = tf.function(lambda src: model.beam_search_impl(src, 1, 0.0))
    np.testing.assert_array_equal(int64_greedy(tf.constant(src)).numpy(), decoding.greedy(engine, src))


# ---- 2. no float on the integer-only path -------------------------------------------------------


@pytest.mark.parametrize("trained", ["w4a8_per_row_embedding"], indirect=True)
def test_every_op_of_the_engine_is_integer(trained):
    _, _, engine, _, _, _ = trained
    src, tgt_in = teacher_forced_inputs(engine.vocab)
    with engine.tracing_ops() as forward_ops:
        engine.forward(src, tgt_in)
    with engine.tracing_ops() as greedy_ops:
        decoding.greedy(engine, src[:3])
    for ops in (forward_ops, greedy_ops):
        assert len(ops) > 100
        for op in ops:
            assert op.output.dtype.kind in "iu", (op.name, op.kind, op.output.dtype)
            for key, value in op.inputs.items():  # integers, or a bool selection (the softmax mask)
                assert np.asarray(value).dtype.kind in "iub", (op.name, key, np.asarray(value).dtype)
        kinds = {op.kind for op in ops}
        assert kinds >= {"embedding_sum", "requantize", "matmul", "relu", "residual", "layer_norm",
                         "softmax"}, kinds


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
@pytest.mark.parametrize("kernel, message", [
    ("layer_norm", r"layer_norm encoder/block_1/ln1/output produced float64"),
    ("_normalize", r"softmax encoder/block_1/self_attention/softmax_output produced float64"),
    ("clip_to", r"embedding_sum embedding_sum produced float64"),
])
def test_a_float_kernel_is_refused(trained, monkeypatch, kernel, message):
    _, _, engine, _, _, _ = trained
    real = getattr(kernels, kernel)
    monkeypatch.setattr(kernels, kernel, lambda *a, **k: real(*a, **k).astype(np.float64))
    src, tgt_in = teacher_forced_inputs(engine.vocab)
    with pytest.raises(TypeError, match=message):
        engine.forward(src, tgt_in)


# ---- 3. --quant none: the exact float model ------------------------------------------------------


def test_quant_none_builds_the_float_model():
    hp = tiny_hp(quant="none", num_blocks=1)
    sites = runs.sites_from_flags(hp)
    assert type(sites) is modules.FloatSites
    tf.random.set_seed(5)
    model = Transformer(hp, 40, sites)
    norms = [m for m in model.submodules if isinstance(m, modules.LayerNorm)]
    assert len(norms) == 5 and all(type(m) is modules.LayerNorm for m in norms)
    assert type(model.embedding_sum) is modules.EmbeddingSum
    attentions = [m for m in model.submodules if isinstance(m, modules.MultiHeadAttention)]
    assert len(attentions) == 3 and all(type(a.softmax) is modules.Softmax for a in attentions)
    int_layers = intonly_layers.IntEmbeddingSum | intonly_layers.IntSoftmax | intonly_layers.IntLayerNorm
    assert not [m for m in model.submodules if isinstance(m, int_layers)]
    for variable in model.trainable_variables:  # non-trivial parameters for the reference below
        variable.assign(tf.random.normal(variable.shape, stddev=0.3, seed=6))

    ids = random_src(40, 3, 7, seed=2)
    table = model.table()
    x = model.embed(tf.constant(ids), table).numpy()
    pe = modules.positional_encoding(7, hp.d_model).numpy()
    reference = model.embedding.numpy()[ids] * np.float32(math.sqrt(hp.d_model)) + pe
    assert reference.dtype == np.float32
    np.testing.assert_array_equal(x, reference)  # exactly: no grid, no rounding but float32's

    # one encoder block by hand, in float64: LN(x + FFN(x)) after LN(x + SelfAttn(x))
    bias = modules.padding_bias(tf.constant(ids))
    y = model.encoder[0](tf.constant(x), bias, training=False).numpy()
    block = model.encoder[0]

    def dense(layer, v):
        return v @ layer.w.numpy().astype(np.float64) + layer.b.numpy()

    def layer_norm(norm, v):
        mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return norm.gamma.numpy() * (v - mean) / np.sqrt(var + norm.eps) + norm.beta.numpy()

    def heads(v):
        return v.reshape(3, 7, hp.num_heads, -1).transpose(0, 2, 1, 3)

    attn, v64 = block.self_attention, x.astype(np.float64)
    q, k, v = heads(dense(attn.wq, v64)), heads(dense(attn.wk, v64)), heads(dense(attn.wv, v64))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hp.d_model // hp.num_heads)
    scores = np.where((ids == token_ids.PAD)[:, None, None, :], -np.inf, scores)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    context = (p @ v).transpose(0, 2, 1, 3).reshape(3, 7, hp.d_model)
    h = layer_norm(block.ln1, v64 + dense(attn.wo, context))
    expected = layer_norm(block.ln2, h + dense(block.ffn.dense2, np.maximum(dense(block.ffn.dense1, h), 0)))
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-5)


# ---- 4. the export's data sheet -----------------------------------------------------------------


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
def test_integer_only_manifest(trained, spm_file, tmp_path):
    model, hp, engine, manifest, out, _ = trained
    assert manifest["format_version"] == export_format.FORMAT_VERSION == 4
    assert manifest["model"]["integer_only"] is True
    d_k = hp.d_model // hp.num_heads
    assert manifest["model"]["softmax_constants"] == list(kernels.exp_constants(15, d_k))
    recorded = kernels.intonly_constants(d_k)
    assert {key: manifest["model"][key] for key in recorded} == recorded
    assert manifest["observed_on"] == "greedy decoding of 6 sentences"

    edges = manifest["edges"]
    assert edges and all({"from", "to", "shift", "rounding"} <= set(e) for e in edges)
    into = {}
    for e in edges:
        into.setdefault(e["to"], set()).add(e["from"])
    for ln_input, sources in residual_sources().items():
        assert into.get(ln_input) == sources, ln_input
    # the shift of an edge is the grid change it makes: skip site -> <ln>/input
    ln1 = site_names.layer_norm(site_names.block_names("encoder", 0).norms[0]).input
    (edge,) = [e for e in edges if e["from"] == site_names.EMBEDDING_SUM and e["to"] == ln1]
    wo = site_names.dense(site_names.attention(site_names.block_names("encoder", 0).self_attention).wo)
    f_skip, f_in = int(engine.f(site_names.EMBEDDING_SUM)), int(engine.f(ln1))
    f_branch = int(engine.f(wo.input) + engine.f(wo.weight))
    assert edge["shift"] == max(f_skip, f_branch) - f_in and edge["rounding"] == hp.rounding
    ln1_names = site_names.layer_norm(site_names.block_names("encoder", 0).norms[0])
    (out_edge,) = [e for e in edges if e["to"] == ln1_names.output]  # gamma n + beta onto the output
    f_gamma, f_out = int(engine.f(ln1_names.gamma)), int(engine.f(ln1_names.output))
    assert out_edge["shift"] == f_gamma + kernels.LN_F - f_out

    accumulators = manifest["accumulators"]
    matmuls = [name for name in accumulators if name.endswith(("/scores", "/context", "/wq", "/dense1"))]
    assert len(matmuls) >= 4 and site_names.OUTPUT_PROJECTION in accumulators
    for name in norm_prefixes():
        assert {f"{name}/residual_sum", f"{name}/variance"} <= set(accumulators)
    for name, entry in accumulators.items():
        assert 0 < entry["observed_max_abs"] <= entry["proven_max_abs"], (name, entry)
        assert entry["proven_bits"] == int(entry["proven_max_abs"]).bit_length() + 1
        assert entry["observed_bits"] == int(entry["observed_max_abs"]).bit_length() + 1

    # the data sheet: every op of one pass in execution order, rendered from the manifest
    ops = manifest["ops"]
    assert [op["call"] for op in ops] == list(range(len(ops))) and ops[-1]["op"] == "argmax"
    sheet = open(os.path.join(out, "datasheet.md")).read()
    order = sheet.split("## Order of operations")[1].split("\n## ")[0]
    rows = [line for line in order.splitlines() if line.split(" | ")[0][2:].isdigit()]
    assert len(rows) == len(ops)
    for row, op in zip(rows, ops):
        assert row.startswith(f"| {op['call']} | {op['op']} | `{op['name']}` |"), row
        assert row.endswith(f"| {datasheet.fmt(op['output'])} |"), row
    first = next(op for op in ops if op["op"] == "requantize")  # the embedding sum onto W^K's input
    assert first["inputs"]["q"]["source"] == site_names.EMBEDDING_SUM
    assert first["params"]["shift"] == int(engine.f(site_names.EMBEDDING_SUM) - engine.f(first["name"]))
    q_ln2, q_b, q_c = manifest["model"]["softmax_constants"]
    assert f"| 15 | {d_k} | {q_ln2} | {q_b} | {q_c} | half_up | 24 | 16 |" in sheet
    for name, entry in accumulators.items():
        assert (f"| `{name}` | {entry['proven_max_abs']} | {entry['proven_bits']} | "
                f"{entry['observed_max_abs']} | {entry['observed_bits']} |") in sheet

    npz = np.load(os.path.join(out, "model.npz"))
    mem = os.path.join(out, "mem")
    sum_grid = export_format.grids_of(npz)[site_names.EMBEDDING_SUM]
    for key in (f"{site_names.EMBEDDING_SUM}/lookup", f"{site_names.EMBEDDING_SUM}/positions"):
        values = export_format.read_mem(os.path.join(mem, export_format.mem_file_name(key)), sum_grid.bits,
                                  sum_grid.signed)
        np.testing.assert_array_equal(values, npz[key].ravel())
    assert npz[f"{site_names.EMBEDDING_SUM}/positions"].shape == (hparams.DEFAULT_MAX_POSITIONS, hp.d_model)
    for norm in norm_prefixes():
        beta = export_format.read_mem(os.path.join(mem, export_format.mem_file_name(f"{norm}/beta")),
                                kernels.LN_MAX_ABS_BETA.bit_length(), True)
        np.testing.assert_array_equal(beta, npz[f"{norm}/beta"].ravel())
        assert os.path.isfile(os.path.join(mem, export_format.mem_file_name(f"{norm}/gamma")))

    short = str(tmp_path / "short")
    export.export_model(model, hp, spm_file, short, max_positions=12)
    small = loader.load_engine(short)
    assert small.max_positions == 12
    fits = random_src(small.vocab, 2, 12, seed=3)
    small.forward(fits, fits)  # 12 positions: fine
    too_long = random_src(small.vocab, 2, 13, seed=3)
    with pytest.raises(ValueError, match="--max_positions"):
        small.forward(too_long, fits)


def test_golden_vectors_replay_through_the_kernels_alone(trained, tmp_path):
    """--dump_vectors: every op of each sentence in execution order, replayed by
    tests/golden_replay.py from the vectors, the index's params and the export's arrays through
    integer/kernels.py alone (no engine): each input is its producer's output, each output and
    kernel intermediate is reproduced, every tensor fits its declared bits and proven bound, the
    mem files hold the same values, and the argmax is the decoded sentence, unpadded."""
    model, hp, engine, _, out, _ = trained
    sentences = [[5, 6, 7, 8, token_ids.EOS], [9, 10, token_ids.EOS]]
    index = golden_vectors.dump_vectors(engine, sentences, str(tmp_path / "vectors"))
    counts = golden_replay.replay(str(tmp_path / "vectors"), out)
    blocks = hp.num_blocks
    per_sentence = {"embedding_sum": 2, "argmax": 1, "layer_norm": 5 * blocks, "residual": 5 * blocks,
                    "softmax": 3 * blocks, "relu": 2 * blocks,
                    "matmul": 22 * blocks + 1}  # encoder 6 attention + 2 FFN, decoder 2 x 6 + 2; logits
    if engine.grids[site_names.EMBEDDING].f.ndim:
        per_sentence["align"] = 1  # a threshold per table row: the logits shifted onto one grid
    assert counts == {kind: n * len(sentences) for kind, n in per_sentence.items()} | {
        "requantize": counts["requantize"]}
    for sentence, src in zip(index["sentences"], sentences):
        assert sentence["src"] == src
        ops = sentence["ops"]
        assert [op["call"] for op in ops] == list(range(len(ops)))
        assert ops[0]["op"] == "embedding_sum" and ops[0]["inputs"]["ids"]["shape"] == [1, len(src)]
        decoder_ids = next(op for op in ops[1:] if op["op"] == "embedding_sum")["inputs"]["ids"]
        assert decoder_ids["shape"] == [1, len(sentence["output"])]  # [BOS] + output[:-1]: no padding
        assert ops[-1]["op"] == "argmax"
        for op in ops:
            for item in op["inputs"].values():
                assert item.get("from") is None or item["from"] < op["call"]
    softmax = next(op for op in index["sentences"][0]["ops"] if op["op"] == "softmax")
    reciprocal = hp.normalization == "reciprocal"  # its reciprocal r (and the softmax's shift t) too
    assert list(softmax["steps"]) == ["x", "x_F", "z", "L", "e", "S"] + ["t", "r"] * reciprocal
    norm = next(op for op in index["sentences"][0]["ops"] if op["op"] == "layer_norm")
    assert list(norm["steps"]) == ["s", "c", "W", "k", "D"] + ["r"] * reciprocal + ["n", "y"]
    with open(os.path.join(tmp_path, "vectors", "sentence_0", "mem", norm["output"]["key"] + ".mem")) as f:
        assert f.readline().startswith(f"// {norm['output']['key']} shape ")


@pytest.mark.parametrize("trained", ["w8a8_reciprocal"], indirect=True)
def test_the_rtl_reproduces_a_reciprocal_export(trained, hw_tools, tmp_path):
    """--normalization reciprocal end to end in hardware: the export's LayerNorm and softmax golden
    vectors (the ops the variant changes; the others are tests/test_rtl_golden.py's) through the RTL
    units (hw.golden, cocotb on Icarus), built with their RECIPROCAL variants from the manifest."""
    _, _, engine, manifest, out, _ = trained
    assert manifest["model"]["normalization"] == "reciprocal"
    golden_vectors.dump_vectors(engine, [[5, 6, 7, token_ids.EOS]], str(tmp_path / "vectors"))
    hw = params.export_params(out)
    assert hw["layer_norm"]["RECIPROCAL"] == hw["softmax"]["RECIPROCAL"] == 1
    results = golden.replay(str(tmp_path / "vectors"), out, str(tmp_path / "work"), verilator=False,
                            kinds=("layer_norm", "softmax"))
    assert results["ops"] == {"layer_norm": 10, "softmax": 6}
    assert set(results["cocotb"]) == {"layer_norm", "softmax"}
    assert all(counts["failed"] == 0 and counts["passed"] > 0 for counts in results["cocotb"].values())


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
@pytest.mark.parametrize("key", ["softmax_F", "softmax_m", "softmax_constants", "layer_norm_K",
                                 "layer_norm_F", "normalization"])
def test_an_export_for_other_kernels_is_refused(trained, key, tmp_path):
    """The engine runs its own kernels: an export whose recorded kernel constants differ (made for
    another exp or LayerNorm) is an ExportError naming the entry, not a silently different model."""
    out = trained[4]
    copy = shutil.copytree(out, tmp_path / "export")
    path = copy / export_format.MANIFEST
    manifest = json.loads(path.read_text())
    value = manifest["model"][key]
    manifest["model"][key] = ("lut" if key == "normalization" else [value[0] + 1, *value[1:]]
                              if isinstance(value, list) else value + 1)
    path.write_text(json.dumps(manifest))
    with pytest.raises(export_format.ExportError, match=rf"the export's {key} .* is not this engine's"):
        loader.load_engine(str(copy))


# ---- 5. an integer-only model from a matmul-only checkpoint --------------------------------------


def test_partial_calibration_keeps_the_parents_thresholds(spm_file, tmp_path):
    parent, hp = calibrated_model(spm_file, wbits=8, abits=8)
    for norm in (m for m in parent.submodules if isinstance(m, modules.LayerNorm)):  # trained-like gammas
        norm.gamma.assign(tf.random.uniform(norm.gamma.shape, 0.5, 1.5, seed=9))
    path = tf.train.Checkpoint(model=parent).write(str(tmp_path / "ckpt" / "parent"))
    hp.integer_only = True
    child = Transformer(hp, parent.vocab_size, runs.sites_from_flags(hp))
    missing = load_weights(child, path)
    parts = ("input", "gamma", "output")
    expected = [site_names.EMBEDDING_SUM] + [getattr(site_names.layer_norm(norm), part)
                                             for norm in norm_prefixes() for part in parts]
    assert len(missing) == len(set(missing))
    assert set(missing) == set(expected)
    probability_sites = [n for n, s in child.sites.sites.items() if isinstance(s, intonly_layers.FixedSite)]
    assert len(probability_sites) == 6 and not set(probability_sites) & set(missing)
    for name in probability_sites:
        assert float(child.sites.sites[name].log2_t) == 0.0
    parent_t = thresholds(parent)
    restored = {n for n in thresholds(child) if n not in missing}
    assert restored == set(parent_t) - set(probability_sites)  # the parent's P sites are variables
    for name in restored:
        np.testing.assert_array_equal(child.sites.sites[name].log2_t.numpy(), parent_t[name], err_msg=name)

    batches = [training_batch(parent.vocab_size, s) for s in range(2)]
    calibration.calibrate(child, batches, method="max", only=missing)
    after = thresholds(child)
    for name in restored:  # the parent's grids stay as they were
        np.testing.assert_array_equal(after[name], parent_t[name], err_msg=name)
    for name in missing:  # the new ones are calibrated (no longer the initial 0)
        assert np.all(np.isfinite(after[name])) and np.any(after[name] != 0.0), name
    for norm in (m for m in child.submodules if isinstance(m, intonly_layers.IntLayerNorm)):
        top = np.abs(norm.gamma.numpy()).max()  # 1 at init: threshold 2, so that 1 is on the grid
        assert float(norm.gamma_site.threshold()) == 2.0 ** (np.floor(np.log2(top)) + 1), norm.path
    # the child now runs in integers
    child.sites.recorded = {}
    src, tgt = batches[0]
    child(tf.constant(src), tf.constant(tgt[:, :-1]))
    assert set(child.sites.recorded) == integer_only_sites()
    child.sites.recorded = None


# ---- 6. surrogate gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
def test_every_trainable_variable_gets_a_finite_gradient(trained):
    model, _, _, _, _, _ = trained
    src, tgt = training_batch(model.vocab_size, 50)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss, n_tokens = model.loss(tf.constant(src), tf.constant(tgt), training=True)
        loss = loss / n_tokens
    grads = tape.gradient(loss, variables)
    assert len(variables) > 100
    for variable, grad in zip(variables, grads):
        assert grad is not None, variable.name
        assert np.all(np.isfinite(tf.convert_to_tensor(grad).numpy())), variable.name
    by_ref = {v.ref(): tf.convert_to_tensor(g).numpy() for v, g in zip(variables, grads)}
    sites = model.sites.sites
    assert np.any(by_ref[sites[site_names.EMBEDDING_SUM].log2_t.ref()] != 0)
    ln_inputs = [site_names.layer_norm(norm).input for norm in norm_prefixes()]
    assert any(np.any(by_ref[sites[name].log2_t.ref()] != 0) for name in ln_inputs)
    # beta (straight-through onto its grid) and the table learn through the surrogates
    norms = [m for m in model.submodules if isinstance(m, intonly_layers.IntLayerNorm)]
    assert len(norms) == 10
    assert all(np.any(by_ref[m.beta.ref()] != 0) for m in norms)
    assert np.any(by_ref[model.embedding.ref()] != 0)
    assert np.any(by_ref[model.encoder[0].self_attention.wq.w.ref()] != 0)


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
def test_the_threshold_report_measures_every_integer_only_site(trained, tmp_path):
    """Outside training the layers skip their float op, but a site recording its inputs (the end of
    training's clip fractions) still sees them: no site's fraction is undefined."""
    model = trained[0]
    sites = list(model.sites.sites.values())
    report = train.threshold_report(model, sites, [training_batch(model.vocab_size, 30)], str(tmp_path))
    rows = report.splitlines()[1:]
    assert len(rows) == len(sites) and "nan" not in report
    ln_input = next(r for r in rows if r.startswith(site_names.layer_norm(norm_prefixes()[0]).input))
    assert float(ln_input.split()[-1].rstrip("%")) >= 0


@pytest.mark.parametrize("trained", ["w8a8"], indirect=True)
def test_the_residual_add_takes_float64_only_where_it_is_exact(trained):
    """IntLayerNorm's residual add in float64 equals the int64 route wherever it is taken (the shift
    down g - f_r at most 37), also with sums beyond 2^53 that only the clip keeps in range; beyond 37
    the int64 route is taken, and a sum is shown that float64 gets wrong there. The input site's
    threshold sweeps the shift from 0 to 58."""
    ln = trained[0].decoder[0].ln1
    site = ln.input_site
    rng = np.random.default_rng(37)
    f_a = int(ln.branch_f())
    x = rng.integers(-128, 128, (4, 3, 32))
    x = intonly_layers.from_int(tf.constant(x), intonly_layers.site_f(ln.skip))
    a = rng.normal(0, 4, (4, 3, 32)) * rng.choice([1, 1e3, 2.0**40], (4, 3, 32))  # up to |A| ~ 2^60
    a = tf.constant(a, tf.float32)
    log2_t, skip_log2_t, seen = site.log2_t.numpy(), ln.skip.log2_t.numpy(), set()
    try:
        for offset in range(-3, 60):
            site.log2_t.assign(log2_t + offset)
            down = int(ln.residual_shifts()[2])
            seen.add(down)
            fits = bool(ln.float64_route_fits())
            assert fits == (down <= intonly_layers.RESIDUAL_FLOAT64_MAX_DOWN)
            int_route = ln._residual_int64(x, a).numpy()
            np.testing.assert_array_equal(ln.residual_integers(x, a).numpy(), int_route)
            if fits:
                np.testing.assert_array_equal(ln._residual_float64(x, a).numpy(), int_route)
        # beyond 37 float64 can fail: total = 1 + 201 2^49 (x = 1 on the finest grid, f_x = f_a + 10;
        # a = 201 2^39 on f_a) loses its 1 and lands on the tie 100.5 of R(total 2^-50) = 101
        f_x = f_a + 10
        ln.skip.log2_t.assign(fixed_point.magnitude_bits(ln.skip.num_bits, ln.skip.signed) - f_x)
        site.log2_t.assign(fixed_point.magnitude_bits(site.num_bits, site.signed) - (f_x - 50))
        assert int(ln.residual_shifts()[2]) == 50
        x, a = tf.constant([2.0**-f_x]), tf.constant([201 * 2.0 ** (39 - f_a)])
        assert ln._residual_int64(x, a).numpy().tolist() == [101]
        assert ln._residual_float64(x, a).numpy().tolist() == [100]
        # the route: decided here (None), or as a decoding decided it for all layers
        for route, expected in ((None, [101]), (False, [101]), (True, [100])):
            ln.recorder.float64_routes = route
            assert ln.residual_integers(x, a).numpy().tolist() == expected, route
    finally:
        ln.recorder.float64_routes = None
        site.log2_t.assign(log2_t)
        ln.skip.log2_t.assign(skip_log2_t)
    assert {0, 37, 38} <= seen and max(seen) > 50


def test_layer_norm_gamma_gets_a_gradient(spm_file):
    """gamma = 1 under threshold 1 would be clipped (the signed grid ends at 1 - 2^-15) and get no
    gradient: max calibration doubles such a threshold (calibration.init_weight_site)."""
    model, _ = calibrated_model(spm_file, integer_only=True)
    src, tgt = training_batch(model.vocab_size, 50)
    norms = [m for m in model.submodules if isinstance(m, intonly_layers.IntLayerNorm)]
    with tf.GradientTape() as tape:
        loss, _ = model.loss(tf.constant(src), tf.constant(tgt), training=True)
    grads = tape.gradient(loss, [m.gamma for m in norms])
    assert [m.path for m, g in zip(norms, grads) if not np.any(g.numpy() != 0)] == []
