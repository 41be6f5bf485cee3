"""Quantization inside the Transformer: every matmul input is quantized, --quant none is the float
model bit for bit, thresholds move when the real model trains."""

import argparse
import contextlib

import numpy as np
import pytest
import tensorflow as tf

import quant
import train
from hparams import train_parser
from integer import calibration, export_format, site_names
from model import Transformer, load_weights
from modules import Dense, FeedForward, FloatSites, Identity, LayerNorm
from runs import sites_from_flags

# ops that only move or reshape values: a fake-quantized tensor stays on its grid through them
PASS_THROUGH = {"Reshape", "Transpose", "Identity", "ExpandDims", "Squeeze"}
MATMULS = {"MatMul", "BatchMatMulV2", "BatchMatMulV3"}


def hp_for(quant_preset="w8a8", **kw):
    args = ["--logdir", "unused", "--d_model", "32", "--d_ff", "64", "--num_blocks", "2",
            "--num_heads", "4", "--dropout_rate", "0", "--quant", quant_preset]
    hp = train_parser().parse_args(args)
    return argparse.Namespace(**{**vars(hp), **kw})


def batch(seed=0, rows=4):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, 40, size=(rows, 7)).astype(np.int32)
    tgt = np.concatenate([np.full((rows, 1), 2), rng.integers(4, 40, size=(rows, 6)),
                          np.full((rows, 1), 3)], 1).astype(np.int32)
    return src, tgt


def unquantized_matmul_inputs(model: Transformer) -> tuple[list[str], int]:
    """Walk the training-forward graph: every MatMul / BatchMatMul input and the embedding
    gather's table must come (through reshapes/transposes) from a fake-quant op, which
    tf.custom_gradient leaves in the graph as IdentityN. Returns (offenders, matmuls seen)."""
    spec = tf.TensorSpec([None, None], tf.int32)
    graph = tf.function(lambda s, t: model(s, t, training=True)).get_concrete_function(spec, spec).graph
    offenders, seen = [], 0
    for op in graph.get_operations():
        if op.type in MATMULS:
            inputs = list(op.inputs)
        elif op.type in ("GatherV2", "ResourceGather"):
            inputs = [op.inputs[0]]  # the embedding table (lookup = one-hot matmul)
        else:
            continue
        seen += 1
        for tensor in inputs:
            producer = tensor.op
            while producer.type in PASS_THROUGH:
                producer = producer.inputs[0].op
            if producer.type != "IdentityN":
                offenders.append(f"{op.name} <- {producer.type} {producer.name}")
    return offenders, seen


def calibrated_model(hp, vocab=40):
    tf.random.set_seed(0)
    model = Transformer(hp, vocab, sites_from_flags(hp))
    calibration.calibrate(model, [batch(1), batch(2)], "max", "max")
    return model


def test_every_matmul_input_is_quantized():
    hp = hp_for("w8a8")
    model = calibrated_model(hp)
    offenders, seen = unquantized_matmul_inputs(model)
    n_sites = len(model.sites.sites)
    # per block: encoder 4 dense + QK^T + PV + 2 FFN dense; decoder twice the attention
    print(f"\n{n_sites} quantization sites; {seen} matmuls/lookups checked")
    assert seen > 30 and not offenders, offenders[:5]
    assert n_sites == 2 * (12 + 4) + 2 * (24 + 4) + 2


def test_the_walker_finds_unquantized_inputs_in_the_float_model():
    offenders, seen = unquantized_matmul_inputs(Transformer(hp_for("none"), 40))
    assert len(offenders) >= seen  # every matmul has at least one float input


def strip_hooks(model: Transformer) -> tuple[int, int]:
    """Replace, in place, every matmul-input hook and every bias hook by a plain Python
    pass-through, so that the model no longer calls any site object: its graph is the float
    model without the hook mechanism. Returns (hooks replaced, bias hooks replaced)."""
    hooks = biases = 0
    for module in [model, *model.submodules]:
        for name, value in list(vars(module).items()):
            if isinstance(value, Identity):
                object.__setattr__(module, name, lambda x: x)
                hooks += 1
            elif name == "_bias":
                object.__setattr__(module, name, lambda b, x_site, w_site: b)
                biases += 1
    return hooks, biases


def test_quant_none_is_the_float_model_bit_for_bit():
    """--quant none against the same weights with no hook objects at all (a model built with
    FloatSites on both sides would share any op a hook added, and could not show it)."""
    hp = hp_for("none")
    tf.random.set_seed(1)
    hooked = Transformer(hp, 40, sites_from_flags(hp))
    bare = Transformer(hp, 40)
    assert type(hooked.sites) is FloatSites
    n_dense = sum(isinstance(m, Dense) for m in bare.submodules)
    # every hook the factory made is held by exactly one module attribute, so none is missed
    assert strip_hooks(bare) == (len(bare.sites.sites), n_dense) and n_dense > 30
    for a, b in zip(bare.trainable_variables, hooked.trainable_variables, strict=True):
        b.assign(a)
    src, tgt = batch(3)
    np.testing.assert_array_equal(bare(src, tgt[:, :-1]).numpy(), hooked(src, tgt[:, :-1]).numpy())
    spec = tf.TensorSpec([None, None], tf.int32)

    def op_types(m):
        graph = tf.function(lambda s, t: m(s, t)).get_concrete_function(spec, spec).graph
        return [op.type for op in graph.get_operations()]

    assert op_types(hooked) == op_types(bare)  # no extra op: the hooks cost nothing
    assert "IdentityN" not in op_types(hooked)


def test_float_hooks_return_their_very_input_and_add_no_op():
    """Each --quant none hook hands back the object it was given (not a copy, not x * 1), eagerly
    and while a tf.function traces, and the trace gains no op from any hook or bias call."""
    hp = hp_for("none")
    model = Transformer(hp, 40, sites_from_flags(hp))
    hooks = list(model.sites.sites.values())
    denses = [m for m in model.submodules if isinstance(m, Dense)]
    assert len(hooks) == 2 * (12 + 4) + 2 * (24 + 4) + 2 and len(denses) > 30
    x = tf.ones([2, 32])
    assert all(hook(x) is x for hook in hooks)
    assert all(d.w_site(d.w) is d.w and d._bias(d.b, d.x_site, d.w_site) is d.b for d in denses)

    results = []

    def traced(x):
        b = x[0]  # a bias that is a graph tensor, not a variable
        before = len(x.graph.get_operations())
        results.append(("hooks", all(hook(x) is x for hook in hooks)))
        results.append(("weights", all(d.w_site(d.w) is d.w for d in denses)))
        results.append(("bias", all(d._bias(b, d.x_site, d.w_site) is b for d in denses)))
        results.append(("bias variable", all(d._bias(d.b, d.x_site, d.w_site) is d.b for d in denses)))
        results.append(("ops added", len(x.graph.get_operations()) - before))
        return x

    tf.function(traced, autograph=False).get_concrete_function(tf.TensorSpec([None, 32]))
    assert results == [("hooks", True), ("weights", True), ("bias", True), ("bias variable", True),
                       ("ops added", 0)]


def test_thresholds_move_when_the_real_model_trains():
    hp = hp_for("w8a8", lr=1e-3, warmup_steps=10)
    model = calibrated_model(hp)
    opt = train.Optimizers(model, hp)
    before = {s.site_name: s.log2_t.numpy().copy() for s in opt.sites}
    step = train.make_train_step(model, tf.distribute.get_strategy(), opt, train_thresholds=True)
    for i in range(5):
        src, tgt = batch(10 + i, rows=8)
        step(tf.constant(src), tf.constant(tgt), tf.constant(float(np.count_nonzero(tgt[:, 1:]))))
    moved = [name for name, v in before.items()
             if np.any(dict((s.site_name, s.log2_t.numpy()) for s in opt.sites)[name] != v)]
    assert len(moved) >= 0.9 * len(before), f"only {len(moved)} of {len(before)} thresholds moved"


@pytest.mark.parametrize("preset, wbits, abits", [("w4a8", 4, 8), ("w6a6", 6, 6)])
def test_presets_and_overrides_set_the_bits(preset, wbits, abits):
    hp = hp_for(preset, quant_override=["*/softmax_output=8"])
    model = Transformer(hp, 40, sites_from_flags(hp))
    sites = model.sites.sites
    assert sites[site_names.EMBEDDING].num_bits == wbits
    for side in ("encoder", "decoder"):
        for i in range(hp.num_blocks):
            names = site_names.block_names(side, i)
            attentions = [names.self_attention] + ([names.cross_attention] if side == "decoder" else [])
            for prefix in attentions:
                attention = site_names.attention(prefix)
                assert sites[attention.probs].num_bits == 8  # the override
                assert sites[attention.query].num_bits == abits
                assert sites[site_names.dense(attention.wq).weight].num_bits == wbits
            ffn = site_names.feed_forward(names.ffn)
            assert not sites[site_names.dense(ffn.dense2).input].signed  # ReLU output is unsigned
            assert sites[site_names.dense(ffn.dense1).input].signed


def quantized_ffn() -> tuple[FeedForward, tf.Tensor, quant.TQTSites]:
    """A W8A8 FFN (d 32 -> 64 -> 32) whose hidden site clips about a tenth of its ReLU'd values,
    an input whose pre-activations are half negative, and the FFN's site factory."""
    hp = hp_for("w8a8")
    tf.random.set_seed(5)
    sites = sites_from_flags(hp)
    ffn = FeedForward("encoder/block_1/ffn", 32, 64, sites)
    ffn.dense1.b.assign(tf.random.normal([64], stddev=0.1))
    x = tf.random.normal([4, 7, 32], seed=6)
    for site, log2_t in [(ffn.dense1.x_site, 2.0), (ffn.dense1.w_site, -1.0), (ffn.dense2.x_site, 0.3),
                         (ffn.dense2.w_site, -1.0)]:
        site.set_log2_t(log2_t)
    hidden = ffn.dense1(x).numpy()
    assert 0.3 < np.mean(hidden < 0) < 0.7 and 0.01 < np.mean(hidden > 1.0) < 0.3
    return ffn, x, sites


def with_explicit_relu(ffn: FeedForward):
    """dense2(max(0, dense1(x))): the FFN as written, whatever its site factory does."""
    return lambda x: ffn.dense2(tf.nn.relu(ffn.dense1(x)))


@pytest.mark.parametrize("kernel", [True, False])
def test_the_unsigned_site_does_the_relus_work_in_value_and_gradients(kernel):
    """The QAT FFN skips its ReLU (TQTSites.relu: Q(max(0, x)) = Q(x) on an unsigned grid): the
    output and every gradient (x, weights, biases, the four log2_t) equal the explicit
    dense2(relu(dense1(x))) bit for bit, on the one-pass gradient kernel and on TF's."""
    ffn, x, sites = quantized_ffn()
    variables = ffn.trainable_variables
    assert len(variables) == 8  # 2 weights, 2 biases, 4 log2_t

    def value_and_grads(forward):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward(x)
            loss = tf.reduce_sum(y * tf.sin(y))  # a dy that varies in sign and size
        return [y, *tape.gradient(loss, [x, *variables])]

    with contextlib.nullcontext() if kernel else quant.without_grad_kernel():
        skipped = value_and_grads(ffn)
        explicit = value_and_grads(with_explicit_relu(ffn))
    for a, b in zip(skipped, explicit, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert np.all(skipped[-3].numpy() != 0)  # dL/dlog2_t of the hidden site: clipping felt

    spec = tf.TensorSpec([None, None, 32])

    def step_op_types(forward):
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(forward(x))
            return tape.gradient(loss, variables)
        return {op.type for op in tf.function(step).get_concrete_function(spec).graph.get_operations()}

    assert not {"Relu", "ReluGrad"} & step_op_types(ffn)  # no ReLU pass, forward or backward
    assert {"Relu", "ReluGrad"} <= step_op_types(with_explicit_relu(ffn))


def test_the_relu_stays_where_the_site_looks_at_its_input():
    """Calibration's observer and `recorded` see max(0, x): their statistics count no negative
    value as clipped; the float model keeps its ReLU."""
    ffn, x, _ = quantized_ffn()
    site = ffn.dense2.x_site
    seen = []
    site.observer = seen.append
    ffn(x)
    site.observer, site.recorded = None, []
    ffn(x)
    assert seen[0].min() == 0.0 and site.recorded[0][0].min() == 0.0
    float_ffn = FeedForward("encoder/block_1/ffn", 32, 64, FloatSites())
    assert np.all(float_ffn(x).numpy() == with_explicit_relu(float_ffn)(x).numpy())


def test_per_channel_weights():
    hp = hp_for("w8a8", per_channel=True)
    model = calibrated_model(hp)
    ffn = site_names.feed_forward(site_names.block_names("encoder", 0).ffn)
    site = model.sites.sites[site_names.dense(ffn.dense1).weight]
    assert site.log2_t.shape == [64]
    assert model.sites.sites[site_names.EMBEDDING].log2_t.shape == []  # shared table: per tensor
    src, tgt = batch(4)
    assert np.all(np.isfinite(model(src, tgt[:, :-1]).numpy()))


def test_per_row_embedding(tmp_path):
    """--per_row_embedding: the table's threshold is [vocab, 1], each row calibrated as a table
    of that row alone would be, trained row by row; a checkpoint whose table threshold is per
    tensor leaves it to be calibrated anew, the other thresholds restored."""
    hp = hp_for("w4a8", per_row_embedding=True)
    model = calibrated_model(hp)
    site = model.sites.sites[site_names.EMBEDDING]
    assert site is model.embedding_site and site.log2_t.shape == [40, 1]
    ffn = site_names.feed_forward(site_names.block_names("encoder", 0).ffn)
    assert model.sites.sites[site_names.dense(ffn.dense1).weight].log2_t.shape == []
    for r, row in enumerate(model.embedding.numpy()):
        alone = quant.QuantSite("row", "weight", num_bits=4)
        calibration.init_weight_site(alone, row)
        assert alone.threshold() == site.threshold()[r, 0]
    assert len(np.unique(site.frac_bits())) > 1  # rows on different grids
    before = site.log2_t.numpy().copy()
    step = train.make_train_step(model, tf.distribute.get_strategy(), train.Optimizers(model, hp), True)
    src, tgt = batch(3)
    step(tf.constant(src), tf.constant(tgt), tf.constant(float(np.count_nonzero(tgt[:, 1:]))))
    moved = (site.log2_t.numpy() != before).ravel()
    assert moved[np.unique(np.concatenate([src.ravel(), tgt.ravel()]))].all()  # rows the batch read

    per_tensor = calibrated_model(hp_for("w4a8"))
    path = tf.train.Checkpoint(model=per_tensor).write(str(tmp_path / "ckpt"))
    assert load_weights(model, path) == [site_names.EMBEDDING]
    assert site.log2_t.shape == [40, 1] and site.log2_t is model.sites.sites[site_names.EMBEDDING].log2_t
    name = site_names.dense(ffn.dense1).weight
    np.testing.assert_array_equal(model.sites.sites[name].log2_t.numpy(),
                                  per_tensor.sites.sites[name].log2_t.numpy())


def test_softmax_probability_sites_calibrate_to_threshold_one():
    """Probabilities lie in [0, 1]: every method gives threshold 1 (KL alone clipped them)."""
    for method in ("kl", "mse", "percentile", "max"):
        hp = hp_for("w8a8")
        model = Transformer(hp, 40, sites_from_flags(hp))
        calibration.calibrate(model, [batch(1)], method, "max")
        probs = [s for s in model.sites.sites.values() if s.role == "probability"]
        assert len(probs) == 6 and all(float(s.threshold()) == 1.0 for s in probs), method


# The naming scheme, spelled out once (every other test builds names with integer/site_names.py's builders):
# (leaf, role, the matmul it feeds relative to the layer) for an attention and an FFN
ATTENTION_SITES = [("wq/input", "activation", "wq"), ("wq/weight", "weight", "wq"),
                   ("wk/input", "activation", "wk"), ("wk/weight", "weight", "wk"),
                   ("wv/input", "activation", "wv"), ("wv/weight", "weight", "wv"),
                   ("wo/input", "activation", "wo"), ("wo/weight", "weight", "wo"),
                   ("query_input", "activation", "scores"), ("key_input", "activation", "scores"),
                   ("softmax_output", "probability", "context"), ("value_input", "activation", "context")]
FFN_SITES = [("dense1/input", "activation", "dense1"), ("dense1/weight", "weight", "dense1"),
             ("dense2/input", "unsigned", "dense2"), ("dense2/weight", "weight", "dense2")]


def test_the_sites_of_a_one_plus_one_block_model_are_the_documented_list():
    """docs/tqt.md "Where the sites are": names, roles and matmuls, in creation order, of the
    model with one encoder and one decoder block; its LayerNorms, bias keys and a mem file name."""
    hp = hp_for("w8a8", num_blocks=1)
    model = Transformer(hp, 40, sites_from_flags(hp))
    layers = [("encoder/block_1/self_attention", ATTENTION_SITES), ("encoder/block_1/ffn", FFN_SITES),
              ("decoder/block_1/self_attention", ATTENTION_SITES),
              ("decoder/block_1/cross_attention", ATTENTION_SITES), ("decoder/block_1/ffn", FFN_SITES)]
    expected = [("embedding/weight", "weight", "decoder/output_projection")]
    expected += [(f"{prefix}/{leaf}", role, f"{prefix}/{matmul}")
                 for prefix, table in layers for leaf, role, matmul in table]
    expected.append(("decoder/output_input", "activation", "decoder/output_projection"))
    sites = [(name, site.role, site_names.matmul_of(name)) for name, site in model.sites.sites.items()]
    assert sites == expected and len(sites) == 2 + 16 + 28
    assert sorted(m.path for m in model.submodules if isinstance(m, LayerNorm)) == [
        "decoder/block_1/ln1", "decoder/block_1/ln2", "decoder/block_1/ln3",
        "encoder/block_1/ln1", "encoder/block_1/ln2"]
    biases = sorted(m.names.bias for m in model.submodules if isinstance(m, Dense))
    assert biases == sorted(f"{prefix}/{leaf.split('/')[0]}/bias" for prefix, table in layers
                            for leaf, _, _ in table if leaf.endswith("/weight"))
    expected = "decoder.block_1.ffn.dense1.bias.mem"
    assert export_format.mem_file_name("decoder/block_1/ffn/dense1/bias") == expected

