"""Integer export and the NumPy integer engine: round trips, bit-exactness, integrity checks."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile

import golden_replay
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

import data_load
import quant
import runs
from corpus import demo as demo_corpus
from integer import (
    calibration,
    datasheet,
    decoding,
    export_format,
    fixed_point,
    golden_vectors,
    loader,
    matmul_engine,
    site_names,
    token_ids,
)
from integer_tf import export
from integer_tf.compare import site_differences
from model import Transformer
from modules import Dense, MultiHeadAttention, padding_bias

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_hp(**kw):
    hp = dict(d_model=32, d_ff=64, num_blocks=2, num_heads=4, dropout_rate=0.0, smoothing=0.1,
              decode_margin=6, seed=1, vocab_size=120, quant="w8a8", wbits=None, abits=None,
              rounding="half_even", per_channel=False, per_row_embedding=False, quant_override=[],
              integer_only=False, residual_bits=16, normalization="exact", eval_batch_size=4, beam=1,
              alpha=0.6, fused_adam=False)
    hp.update(kw)
    return types.SimpleNamespace(**hp)


def random_src(vocab, batch=6, length=9, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
    for i in range(batch):  # ragged: EOS then padding
        n = rng.integers(2, length)
        src[i, n], src[i, n + 1:] = token_ids.EOS, token_ids.PAD
    return src


def calibrate_sites(module, run):
    """As calibration.calibrate for one layer: every QuantSite of `module` observes (passing its
    input through in float) while `run()` executes; then weights from max|w|, activations by max."""
    sites = [m for m in module.submodules if isinstance(m, quant.QuantSite)]
    observed = calibration.observe(sites)
    run()
    for site in sites:
        site.observer = None
    for dense in [module, *module.submodules]:
        if isinstance(dense, Dense):
            calibration.init_weight_site(dense.w_site, dense.w.numpy())
    for site in sites:
        if site.role != "weight":
            calibration.calibrate_site(site, observed[site.site_name], "max")
    assert all(site.observer is None for site in sites)


def demo_spm(cache: str) -> tuple[str, list[str]]:
    """A 120-piece SentencePiece model of 300 demo pairs in `cache`, and 10 of their sources."""
    pairs = demo_corpus.generate_pairs(300, seed=5)
    data_load.load_or_train_spm([p[0] for p in pairs], [p[1] for p in pairs], 120, cache)
    (name,) = [f for f in os.listdir(cache) if f.endswith(".model")]
    return os.path.join(cache, name), [p[0] for p in pairs[:10]]


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
    return demo_spm(str(tmp_path_factory.mktemp("spm")))


def calibrated_model(spm_path, **kw):
    """A tiny random Transformer with a large embedding (varied outputs), calibrated."""
    vocab = spm.SentencePieceProcessor(model_file=spm_path).get_piece_size()
    hp = tiny_hp(**kw)
    tf.random.set_seed(3)
    model = Transformer(hp, vocab, runs.sites_from_flags(hp))
    model.embedding.assign(tf.random.normal(model.embedding.shape, stddev=1.0, seed=4))
    batches = [(random_src(vocab, 8, 10, seed=s), random_src(vocab, 8, 11, seed=10 + s))
               for s in range(3)]
    calibration.calibrate(model, batches, method="max")
    return model, hp


EXPORTS = {"w8a8": dict(wbits=8, abits=8), "w4a8": dict(wbits=4, abits=8),
           "w8a8_per_channel_half_up": dict(wbits=8, abits=8, per_channel=True, rounding="half_up"),
           "w6a6_floor": dict(wbits=6, abits=6, rounding="floor"),
           "w4a8_per_row_embedding": dict(wbits=4, abits=8, per_row_embedding=True)}


@pytest.fixture(scope="module", params=list(EXPORTS))
def exported(request, spm_file, tmp_path_factory):
    model, hp = calibrated_model(spm_file[0], **EXPORTS[request.param])
    out = str(tmp_path_factory.mktemp("export") / "model")
    manifest = export.export_model(model, hp, spm_file[0], out)
    return model, hp, out, manifest


# ---- mem files and the export round trip -------------------------------------------------


@pytest.mark.parametrize("bits,signed", [(4, True), (8, True), (6, True), (8, False), (32, True)])
def test_mem_file_round_trip(tmp_path, bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = np.concatenate([[lo, hi, 0, -1 if signed else 1],
                             np.random.default_rng(bits).integers(lo, hi + 1, 200)])
    path = str(tmp_path / "v.mem")
    export_format.write_mem(path, values, bits, signed, comment="test")
    lines = open(path).read().splitlines()
    assert lines[0].startswith("//") and all(len(w) == -(-bits // 4) for w in lines[1:])
    np.testing.assert_array_equal(export_format.read_mem(path, bits, signed), values)


def test_mem_file_rejects_values_out_of_range(tmp_path):
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        export_format.write_mem(str(tmp_path / "v.mem"), np.array([8]), 4, True)


def test_export_round_trip(exported):
    model, hp, out, manifest = exported
    npz = np.load(os.path.join(out, "model.npz"))
    grids = export_format.grids_of(npz)
    for site, weight in model.weight_sites():
        q = npz[site.site_name]
        assert q.dtype == np.int8  # 4- and 8-bit weights
        n, p = fixed_point.integer_range(site.num_bits, True)
        assert q.min() >= n and q.max() <= p and q.min() < 0
        fake = quant.tqt_fake_quant(weight, site.log2_t, site.num_bits, True, site.rounding).numpy()
        np.testing.assert_array_equal(q * np.exp2(-site.frac_bits().astype(float)), fake)
        mem = export_format.read_mem(os.path.join(out, "mem", export_format.mem_file_name(site.site_name)),
                               grids[site.site_name].bits, True)
        np.testing.assert_array_equal(mem.reshape(q.shape), q)
    dense1 = site_names.dense(site_names.feed_forward(site_names.block_names("decoder", 0).ffn).dense1)
    bias = npz[dense1.bias]
    assert bias.dtype == np.int32
    mem = export_format.read_mem(os.path.join(out, "mem", export_format.mem_file_name(dense1.bias)), 32, True)
    np.testing.assert_array_equal(mem, bias)
    # the files' text as a $readmemh reader sees it: two's complement in ceil(bits/4) hex digits
    for key, bits in ((dense1.bias, 32), (site_names.EMBEDDING, hp.wbits)):
        digits = -(-bits // 4)
        lines = open(os.path.join(out, "mem", export_format.mem_file_name(key))).read().splitlines()
        assert lines[0].startswith("//") and lines[1:] == [
            format(int(v) % 16**digits, f"0{digits}x") for v in npz[key].ravel()]
    for norm in site_names.block_names("encoder", 0).norms + site_names.block_names("decoder", 0).norms:
        assert npz[f"{norm}/gamma"].dtype == npz[f"{norm}/beta"].dtype == np.float32
    assert manifest["npz"]["sha256"] == export_format.sha256_file(os.path.join(out, "model.npz"))
    assert {row["name"] for row in manifest["sites"]} == set(model.sites.sites)
    assert manifest["hparams"]["wbits"] == hp.wbits and manifest["model"]["rounding"] == hp.rounding
    # format 2: the rounding lives in the engine's config only, and every export is quantized
    assert manifest["format_version"] == export_format.FORMAT_VERSION == 4
    assert "rounding" not in manifest and "quantized" not in manifest
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest
    assert not [f for f in os.listdir(os.path.dirname(out)) if f.startswith(".")]  # no temp left
    # the data sheet: the matmuls in execution order (operand grids, bias, proven accumulator width),
    # after what stays float
    sheet = open(os.path.join(out, "datasheet.md")).read()
    assert "## What stays float (matmul-only)" in sheet
    ops = manifest["ops"]
    assert [op["op"] for op in ops] == ["matmul"] * (22 * hp.num_blocks + 1)
    dense1_op = next(op for op in ops if op["name"] == site_names.matmul_of(dense1.input))
    assert dense1_op["params"]["bias"] == dense1.bias and dense1_op["inputs"]["x"]["f"] == int(
        grids[dense1.input].f)
    np.testing.assert_array_equal(dense1_op["output"]["f"], grids[dense1.input].f + grids[dense1.weight].f)
    row = next(line for line in sheet.splitlines() if f"| `{dense1_op['name']}` |" in line)
    assert row.endswith(f"| {datasheet.fmt(dense1_op['output'])} |")


# ---- layers: identical values in both engines ---------------------------------------------


@pytest.mark.parametrize("rounding,per_channel", [("half_even", False), ("half_up", True),
                                                  ("floor", False)])
def test_dense_layer_identical(rounding, per_channel):
    tf.random.set_seed(1)
    sites = quant.TQTSites(quant.QuantConfig(8, 8, rounding=rounding, per_channel=per_channel))
    dense = Dense("layer", 48, 24, sites)
    dense.b.assign(tf.random.normal([24], stddev=0.5))
    x = tf.random.normal([3, 5, 48], stddev=2.0)
    calibrate_sites(dense, lambda: dense(x))
    engine = matmul_engine.IntTransformer(export.quantized_arrays(dense),
                                          {"rounding": rounding, "num_heads": 1})
    y = engine.dense("layer", x.numpy())
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, dense(x).numpy())


def test_attention_block_identical():
    tf.random.set_seed(2)
    attention = MultiHeadAttention("attn", 32, 4, quant.TQTSites(quant.QuantConfig(8, 8)))
    x, memory = tf.random.normal([2, 5, 32]), tf.random.normal([2, 7, 32])
    bias = padding_bias(tf.constant([[5] * 7, [5] * 4 + [0] * 3]))
    calibrate_sites(attention, lambda: attention(x, memory, bias))
    engine = matmul_engine.IntTransformer(export.quantized_arrays(attention), {"rounding": "half_even",
                                                                         "num_heads": 4})
    y = engine.attention("attn", x.numpy(), memory.numpy(), bias.numpy())
    np.testing.assert_array_equal(y, attention(x, memory, bias).numpy())


# ---- the whole model ----------------------------------------------------------------------


def test_integer_model_equals_fake_quant_model(exported):
    model, _, out, _ = exported
    engine = loader.load_engine(out)
    src = random_src(engine.vocab, 8, 10, seed=7)
    greedy = decoding.greedy(engine, src)
    assert len({tuple(token_ids.strip_ids(r)) for r in greedy}) > 4, "degenerate test model"
    np.testing.assert_array_equal(greedy, model.greedy(tf.constant(src)).numpy())
    np.testing.assert_array_equal(greedy, decoding.beam_search(engine, src, 1, 0.0))  # argmax = TF's ranking
    np.testing.assert_array_equal(decoding.beam_search(engine, src, 3, 0.6),
                                  model.beam_search(tf.constant(src), 3, 0.6).numpy())
    tgt_in = np.concatenate([np.full((8, 1), token_ids.BOS), greedy[:, :-1]], axis=1)
    rows, tf_logits, int_logits = site_differences(model, engine, src, tgt_in)
    # the TF side's integers are its own fake-quant outputs: every matmul operand, weights and
    # activations alike, must be the same integer in both engines, and so the logits
    assert {r["site"] for r in rows} == set(model.sites.sites)  # every site compared
    assert all(r["float32_exact"] for r in rows)
    assert [r for r in rows if r["n_diff"]] == []
    np.testing.assert_array_equal(int_logits, tf_logits)
    stats = engine.accumulator_stats()
    encoder_attention = site_names.attention(site_names.block_names("encoder", 0).self_attention)
    assert set(stats) >= {site_names.OUTPUT_PROJECTION, encoder_attention.scores}
    assert all(s["bits"] <= 32 for s in stats.values())


def test_translate_lines_matches_runs_translate(exported, spm_file):
    model, hp, out, _ = exported
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "spm.model"))
    lines = spm_file[1]
    engine = loader.load_engine(out)
    assert data_load.translate_lines(engine, sp, lines, 4) == runs.translate(model, sp, lines, hp)


def test_dump_vectors(exported, tmp_path):
    """A matmul-only export's golden vectors: each matmul's integer operands and accumulator in
    execution order, one unpadded sentence each, replayed from the vectors and the export's arrays
    alone (tests/golden_replay.py); a weight operand is named, not copied."""
    _, _, out, _ = exported
    engine = loader.load_engine(out)
    sentences = [[5, 6, 7, 3], [8, 9, 3]]
    index = golden_vectors.dump_vectors(engine, sentences, str(tmp_path))
    assert index["engine"] == "matmul_only" and len(index["sentences"]) == 2
    blocks = engine.config["num_blocks"]
    assert golden_replay.replay(str(tmp_path), out) == {"matmul": 2 * (22 * blocks + 1)}
    ops = index["sentences"][0]["ops"]
    wk = site_names.dense(site_names.attention(site_names.block_names("encoder", 0).self_attention).wk)
    first = ops[0]  # the first block's W^K: x @ W + b
    assert first["name"] == site_names.matmul_of(wk.input) and first["params"]["x_site"] == wk.input
    assert first["params"]["weight"] == wk.weight and first["params"]["bias"] == wk.bias
    assert first["inputs"]["x"]["shape"] == [1, 4, engine.d_model] and "w" not in first["inputs"]
    attention = site_names.attention(site_names.block_names("encoder", 0).self_attention)
    scores = next(op for op in ops if op["name"] == attention.scores)  # Q K^T: K is an activation
    assert scores["params"]["w_site"] == attention.key and scores["params"]["transpose_w"]
    assert scores["inputs"]["w"]["bits"] == engine.grids[attention.key].bits
    assert ops[-1]["name"] == site_names.OUTPUT_PROJECTION


@pytest.mark.parametrize("x_signed", [True, False])
def test_wide_accumulation_is_exact(x_signed):
    """K = 3000 products of 8-bit extremes pass 2^24: the engine sums float32 chunks in float64
    and adds int32 biases exactly; the result equals int64 arithmetic."""
    rng = np.random.default_rng(5)
    n, p = (-128, 127) if x_signed else (0, 255)
    x = rng.choice([n, p], size=(4, 3000)).astype(np.float32)
    w = rng.choice([-128, 127], size=(3000, 6)).astype(np.int8)
    w[:, 0] = -128 if x_signed else 127  # a column whose sum is far beyond 2^24
    x[0] = n
    bias = rng.integers(-(2**31), 2**31 - 1, size=6).astype(np.int32)
    names = site_names.dense("l")
    arrays = {names.weight: w, names.bias: bias,
              **export_format.grid_arrays(names.input, fixed_point.Grid(8, x_signed, np.int64(0))),
              **export_format.grid_arrays(names.weight, fixed_point.Grid(8, True, np.int64(0)))}
    engine = matmul_engine.IntTransformer(arrays, {"rounding": "half_even", "num_heads": 1})
    exact = x.astype(np.int64) @ w.astype(np.int64) + bias
    assert np.abs(exact).max() > 2**24
    with engine.tracing() as trace:
        y = engine.dense("l", x)
    np.testing.assert_array_equal(trace[0].acc, exact.astype(np.float64))
    np.testing.assert_array_equal(y, exact.astype(np.float32))  # one rounding, as in TF


def test_accumulator_over_32_bits_warns(capsys):
    w = np.full((64, 2), 32767, np.int16)
    names = site_names.dense("l")
    grid = fixed_point.Grid(16, True, np.int64(0))
    arrays = {names.weight: w, **export_format.grid_arrays(names.input, grid),
              **export_format.grid_arrays(names.weight, grid)}
    engine = matmul_engine.IntTransformer(arrays, {"rounding": "half_even", "num_heads": 1})
    engine.dense("l", np.full((1, 64), 30000.0, np.float32))
    matmul = site_names.matmul_of(names.input)
    assert engine.accumulator_stats() == {matmul: {"max_abs": 64 * 30000 * 32767, "bits": 37}}
    warning = f"warning: {matmul} accumulator reached {64 * 30000 * 32767} (37 bits > 32)"
    assert warning in capsys.readouterr().err


# ---- integrity ----------------------------------------------------------------------------


@pytest.fixture
def export_copy(exported, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(exported[2], path)
    return path


def _edit_manifest(path, **changes):
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest.update(changes)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def test_tampered_npz_is_caught(export_copy):
    path = os.path.join(export_copy, "model.npz")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(export_format.ExportError, match="model.npz.*checksum mismatch"):
        loader.load_engine(export_copy)


def test_missing_npz_and_spm_mismatch(export_copy):
    with open(os.path.join(export_copy, "spm.model"), "ab") as f:
        f.write(b"x")
    with pytest.raises(export_format.ExportError, match="spm.model: spm model checksum mismatch"):
        loader.load_engine(export_copy)
    os.remove(os.path.join(export_copy, "model.npz"))
    with pytest.raises(export_format.ExportError, match="model.npz missing"):
        loader.load_engine(export_copy)


EMBEDDING, GAMMA = site_names.EMBEDDING, f"{site_names.block_names('encoder', 0).norms[0]}/gamma"


@pytest.mark.parametrize("members, message", [
    ({f"{EMBEDDING}.npy": b"\x93NUMPY junk"}, r"corrupt model.npz \(ValueError\)"),
    ({"junk.txt": b"not an array"}, r"corrupt model.npz \('junk.txt' is not an array\)"),
    ({f"{GAMMA}.npy": np.ones(2, np.float32)}, rf"corrupt model.npz \(no '{re.escape(EMBEDDING)}'\)"),
    ({f"{EMBEDDING}.npy": np.zeros((3, 2), np.float32), f"{EMBEDDING}.bits.npy": np.int32(8)},
     f"'{re.escape(EMBEDDING)}' holds float32, not integers"),
])
def test_corrupt_npz_with_matching_checksum(export_copy, members, message):
    """Each way model.npz can be damaged (with a checksum that matches, so the damage is in
    what was written) gets its own one-line message."""
    path = os.path.join(export_copy, "model.npz")
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            if not isinstance(content, bytes):
                buffer = io.BytesIO()
                np.save(buffer, content)
                content = buffer.getvalue()
            z.writestr(name, content)
    _edit_manifest(export_copy, npz={"path": "model.npz", "sha256": export_format.sha256_file(path)})
    with pytest.raises(export_format.ExportError, match=f"model.npz: {message}"):
        loader.load_engine(export_copy)


def test_unknown_format_version(export_copy):
    _edit_manifest(export_copy, format_version=99)
    message = (r"manifest.json: export format version 99, but this code reads version 4: "
               r"re-export it \(python -m integer_tf.export\)$")
    with pytest.raises(export_format.ExportError, match=message):
        loader.load_engine(export_copy)


def as_format_version_1(path):
    """Turn an export into what the format-1 exporter wrote: a top-level "quantized" flag and
    "rounding" besides the engine's config, and format_version 1."""
    with open(os.path.join(path, "manifest.json")) as f:
        rounding = json.load(f)["model"]["rounding"]
    _edit_manifest(path, format_version=1, quantized=True, rounding=rounding)


@pytest.mark.parametrize("exported", ["w8a8"], indirect=True)  # one export: eval.py starts TF
def test_format_version_1_export_is_refused_with_a_re_export_hint(export_copy):
    """An export from before the format change (version 1) is one ExportError line naming the
    manifest and saying to re-export, in the engine and from eval.py (exit 1, no traceback)."""
    as_format_version_1(export_copy)
    manifest_path = os.path.join(export_copy, "manifest.json")
    with pytest.raises(export_format.ExportError) as error:
        loader.load_engine(export_copy)
    message = str(error.value)
    assert message == (f"{manifest_path}: export format version 1, but this code reads version 4: "
                       "re-export it (python -m integer_tf.export)")
    with pytest.raises(export_format.ExportError, match="re-export"):
        export_format.read_manifest(export_copy)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "eval.py", "--engine", "int", "--export", export_copy],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message}"] and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert proc.stdout == ""


def test_float_export_is_refused(spm_file, tmp_path, export_copy):
    float_model = Transformer(tiny_hp(quant="none"), 40)
    with pytest.raises(ValueError, match=r"export needs a quantized model \(--quant ...\)"):
        export.export_model(float_model, tiny_hp(quant="none"), spm_file[0], str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    _edit_manifest(export_copy, sites=[])
    with pytest.raises(export_format.ExportError, match="export from a float checkpoint"):
        loader.load_engine(export_copy)


def test_interrupted_export_leaves_no_partial_directory(exported, spm_file, monkeypatch):
    model, hp, out, _ = exported
    before = export_format.sha256_file(os.path.join(out, "manifest.json"))
    calls = []

    def failing_write_mem(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # as if interrupted mid-write
        return real_write_mem(*args, **kwargs)

    real_write_mem = export_format.write_mem
    monkeypatch.setattr(export_format, "write_mem", failing_write_mem)
    fresh = os.path.join(os.path.dirname(out), "fresh")
    for target in (out, fresh):  # replacing an existing export, and a new one
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            export.export_model(model, hp, spm_file[0], target)
    assert export_format.sha256_file(os.path.join(out, "manifest.json")) == before
    assert sorted(os.listdir(os.path.dirname(out))) == ["model"]
    loader.load_engine(out)


def test_the_engines_import_no_tensorflow():
    code = "import integer.loader, integer.golden_vectors, sys; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
