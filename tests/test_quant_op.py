"""quant.py against independent references: NumPy for the forward and the STE gradients of
docs/tqt.md ("Forward", "Gradients"), finite differences for the gradients, the reference and
the fused path against each other ("The fused path"), and the TQT sites' bookkeeping."""

import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import quant
from integer import calibration, fixed_point, site_names

ROUND = {"half_even": np.rint, "half_up": lambda v: np.floor(v + 0.5), "floor": np.floor}
BITS = [2, 3, 4, 6, 8, 12, 16]
SCALAR_LOG2_T = 0.37  # not an integer: ceil makes the threshold 2, not 2^0.37
CHANNEL_LOG2_T = [-2.6, -0.0, 0.4, 3.0, 1.5]  # negative, integer and fractional exponents
# written out here, not read from quant.FUSED_ROUND_MODES: the dispatch test checks quant against it
FUSED_ROUNDINGS = ("half_even", "half_up")
OPS = {"dispatch": quant.tqt_fake_quant, "reference": quant.tqt_fake_quant_reference,
       "fused": quant.tqt_fake_quant_fused}


def np_range(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def np_scale(log2_t, bits, signed, dtype):
    """s = 2^ceil(log2_t) / 2^(b-1) (signed) or / 2^b (unsigned), exactly, via ldexp."""
    exponent = np.ceil(np.asarray(log2_t, np.float64)).astype(np.int32) - (bits - 1 if signed else bits)
    return np.ldexp(np.ones_like(exponent, dtype), exponent)


def np_tqt(x, log2_t, bits, signed, rounding, dy):
    """NumPy reference: y, dL/dx and dL/dlog2_t (the latter in float64)."""
    n, p = np_range(bits, signed)
    s = np_scale(log2_t, bits, signed, x.dtype)
    v = x / s
    r = ROUND[rounding](v)
    y = np.clip(r, n, p) * s
    dx = np.where((v >= n) & (v <= p), dy, 0)
    g = s.astype(np.float64) * math.log(2) * np.where(v < n, n, np.where(v > p, p, r - v))
    per_element = dy.astype(np.float64) * g
    if np.ndim(log2_t) == 0:
        dl = per_element.sum()
    elif np.ndim(log2_t) == 1:  # per channel: x's last axis
        dl = per_element.reshape(-1, len(log2_t)).sum(0)
    else:  # per row: log2_t [C, 1] against x [C, d]
        dl = per_element.sum(axis=1, keepdims=True)
    return y, dx, dl


def make_x(rng, shape, log2_t, bits, signed, dtype):
    """x covering the grid's interior, both clipping sides, exact rounding ties and the exact
    ends n*s and p*s."""
    n, p = np_range(bits, signed)
    margin = 0.25 * (p - n) + 2
    v = rng.uniform(n - margin, p + margin, size=shape)
    v.flat[:6] = [n, p, n + 0.5, p - 0.5, n - 0.5, p + 0.5]  # ends and ties at them
    v.flat[6:12] = np.floor(rng.uniform(n, p, size=6)) + 0.5  # ties inside
    return (v * np_scale(log2_t, bits, signed, np.float64)).astype(dtype)


def run_op(x, log2_t, dy, op=quant.tqt_fake_quant, **kwargs):
    """y and both gradients of the op, log2_t as the float32 variable a QuantSite owns."""
    x = tf.constant(x)
    log2_t = tf.Variable(log2_t, dtype=tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = op(x, log2_t, **kwargs)
    dx, dl = tape.gradient(y, [x, log2_t], output_gradients=tf.constant(dy))
    return y.numpy(), dx.numpy(), dl.numpy()


def op_cases():
    """Every mode through the dispatching op; where it takes the fused kernels (per tensor,
    half_even/half_up) also the reference and the fused op directly, so a bug in either shows
    although the model only runs one of them there."""
    for dtype in (np.float32, np.float64):
        for layout in LAYOUTS:
            for bits in BITS:
                for signed in (True, False):
                    for rounding in fixed_point.ROUNDINGS:
                        fusable = rounding in FUSED_ROUNDINGS and layout == "tensor"
                        for op in ("dispatch", "reference", "fused") if fusable else ("dispatch",):
                            yield pytest.param(op, rounding, signed, bits, layout, dtype, id="-".join([
                                op, rounding, "signed" if signed else "unsigned", str(bits), layout,
                                dtype.__name__]))


# threshold layouts: (log2_t, the shape of x it broadcasts against)
LAYOUTS = {"tensor": (SCALAR_LOG2_T, (6, 4, 5)), "channel": (CHANNEL_LOG2_T, (6, 4, 5)),
           "row": ([[t] for t in CHANNEL_LOG2_T], (5, 8))}


@pytest.mark.parametrize("op, rounding, signed, bits, layout, dtype", list(op_cases()))
def test_forward_and_gradients_match_numpy(op, rounding, signed, bits, layout, dtype):
    rng = np.random.default_rng(bits)
    log2_t, shape = np.array(LAYOUTS[layout][0], np.float32), LAYOUTS[layout][1]
    x = make_x(rng, shape, log2_t, bits, signed, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y, dx, dl = run_op(x, log2_t, dy, OPS[op], num_bits=bits, signed=signed, rounding=rounding)
    y_ref, dx_ref, dl_ref = np_tqt(x, log2_t, bits, signed, rounding, dy)

    assert y.dtype == dtype and dl.shape == log2_t.shape
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    tol = 1e-5 if dtype == np.float32 else 1e-6  # dl is float32: log2_t's dtype
    np.testing.assert_allclose(dl, dl_ref, rtol=tol, atol=tol * np.abs(dl_ref).max())


@pytest.mark.parametrize("op", ["dispatch", "reference"])
def test_rounding_modes_differ_on_ties(op):
    x = tf.constant([0.5, 1.5, 2.5, -0.5, -1.5, 0.75])
    outputs = {r: OPS[op](x, 7.0, 8, True, r).numpy() for r in fixed_point.ROUNDINGS}  # s = 1
    np.testing.assert_array_equal(outputs["half_even"], [0, 2, 2, -0, -2, 1])
    np.testing.assert_array_equal(outputs["half_up"], [1, 2, 3, 0, -1, 1])
    np.testing.assert_array_equal(outputs["floor"], [0, 1, 2, -1, -2, 0])
    for r in FUSED_ROUNDINGS:
        np.testing.assert_array_equal(quant.tqt_fake_quant_fused(x, 7.0, 8, True, r), outputs[r])


# ---- which path tqt_fake_quant takes (the two are compared bit for bit in test_quant_properties.py) ----


def traced_op_types(log2_t, rounding, gradient):
    """The op types in the graph of tqt_fake_quant (with its gradient when asked), traced by
    tf.function, its function library included."""
    x = tf.constant(np.linspace(-2.0, 2.0, 20).reshape(4, 5), tf.float32)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = quant.tqt_fake_quant(x, log2_t, 4, True, rounding)
        return tape.gradient(y, x) if gradient else y

    graph = step.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph.as_graph_def().library.function:
        types |= {node.op for node in function.node_def}
    return types


@pytest.mark.parametrize("form", ["variable", "python"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rounding", fixed_point.ROUNDINGS)
def test_dispatch_takes_the_fused_kernels_exactly_per_tensor_with_half_roundings(rounding, per_channel, form,
                                                                                 fused_grad_op):
    value = [0.5] * 5 if per_channel else 0.5
    log2_t = tf.Variable(value) if form == "variable" else value
    fused = rounding in FUSED_ROUNDINGS and not per_channel
    forward = traced_op_types(log2_t, rounding, gradient=False)
    backward = traced_op_types(log2_t, rounding, gradient=True)
    assert ("QuantizeAndDequantizeV4" in forward) == fused
    assert (fused_grad_op in backward) == fused
    if fused_grad_op == "TqtFakeQuantGrad":  # one backward, not the kernel beside TF's
        assert "QuantizeAndDequantizeV4Grad" not in backward
    # one path, not both: the reference divides by s and rounds; the kernel does neither
    assert bool({"RealDiv", "Round", "Floor"} & forward) == (not fused)


def test_fused_path_refuses_floor_and_per_channel_thresholds():
    x = tf.zeros([3, 4])
    with pytest.raises(ValueError, match="no fused kernel for rounding 'floor'"):
        quant.tqt_fake_quant_fused(x, 0.0, 8, True, "floor")
    for rounding in FUSED_ROUNDINGS:
        for log2_t in ([0.0] * 4, [0.0], tf.zeros([4]), tf.Variable(tf.zeros([4]))):
            with pytest.raises(ValueError, match="no fused kernel"):
                quant.tqt_fake_quant_fused(x, log2_t, 8, True, rounding)
    quant.tqt_fake_quant_fused(x, tf.Variable(0.0), 8, True, "half_up")  # a scalar variable is fine


# ---- finite differences ---------------------------------------------------------------------


def tf_ste_surrogate(x, log2_t, bits, signed, rounding):
    """The forward rewritten with plain autodiff: ceil and R made straight-through by
    stop_gradient, the clip decided on x/s as the STE defines it."""
    n, p = np_range(bits, signed)
    c = log2_t + tf.stop_gradient(tf.math.ceil(log2_t) - log2_t)  # ceil, d/du := 1
    s = tf.pow(tf.constant(2.0, x.dtype), c - (bits - 1 if signed else bits))
    v = x / s
    r = v + tf.stop_gradient(quant.round_integer(v, rounding) - v)  # R, d/dv := 1
    n, p = tf.constant(n, x.dtype), tf.constant(p, x.dtype)
    return s * tf.where(v < n, n, tf.where(v > p, p, r))


def frozen_surrogate_loss(x, log2_t, log2_t0, bits, signed, rounding, dy):
    """sum(dy * y) with the ceil offset, the rounding offset R(v0) - v0 and the clip regions
    held at log2_t0: smooth in log2_t, equal to the forward at log2_t0."""
    n, p = np_range(bits, signed)
    w = bits - 1 if signed else bits
    s0 = np.exp2(np.ceil(log2_t0) - w)
    v0 = x / s0
    s = np.exp2(log2_t + (np.ceil(log2_t0) - log2_t0) - w)
    inside = x + s * (ROUND[rounding](v0) - v0)
    y = np.where(v0 < n, n * s, np.where(v0 > p, p * s, inside))
    return np.sum(dy * y)


def op_and_surrogate(x, log2_t0, bits, signed, rounding, dy):
    """y and dL/dlog2_t of tqt_fake_quant and of tf_ste_surrogate with a float64 log2_t of
    log2_t0's shape (a scalar takes the fused path for half_even/half_up)."""
    log2_t = tf.Variable(log2_t0, dtype=tf.float64)
    with tf.GradientTape(persistent=True) as tape:
        y = quant.tqt_fake_quant(tf.constant(x), log2_t, bits, signed, rounding)
        y_sur = tf_ste_surrogate(tf.constant(x), log2_t, bits, signed, rounding)
    grad = tape.gradient(y, log2_t, output_gradients=tf.constant(dy)).numpy()
    grad_sur = tape.gradient(y_sur, log2_t, output_gradients=tf.constant(dy)).numpy()
    return y.numpy(), grad, y_sur.numpy(), grad_sur


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("rounding", fixed_point.ROUNDINGS)
def test_log2_t_gradient_is_the_ste_derivative(rounding, signed, per_channel):
    """Per channel (the reference path) and per tensor, one column at a time (the fused path
    for half_even/half_up): the same gradient as autodiff of the STE surrogate and as a central
    difference of the frozen surrogate."""
    rng = np.random.default_rng(1)
    bits, log2_t0 = 4, np.array(CHANNEL_LOG2_T)
    x = make_x(rng, (40, 5), log2_t0, bits, signed, np.float64)
    dy = rng.normal(size=x.shape)
    v = x / np_scale(log2_t0, bits, signed, np.float64)
    n, p = np_range(bits, signed)
    assert (v < n).any() and (v > p).any() and ((v > n) & (v < p)).any()

    if per_channel:
        y, grad, y_sur, grad_sur = op_and_surrogate(x, log2_t0, bits, signed, rounding, dy)
    else:
        columns = [op_and_surrogate(x[:, c], log2_t0[c], bits, signed, rounding, dy[:, c])
                   for c in range(len(log2_t0))]
        y, grad, y_sur, grad_sur = (np.stack(parts, axis=-1) for parts in zip(*columns))
    assert grad.shape == log2_t0.shape
    np.testing.assert_array_equal(y, y_sur)
    np.testing.assert_allclose(grad, grad_sur, rtol=1e-12, atol=1e-12)

    h = 1e-6
    for c in range(len(log2_t0)):
        step = h * np.eye(len(log2_t0))[c]
        loss_plus, loss_minus = (frozen_surrogate_loss(x, log2_t0 + d, log2_t0, bits, signed, rounding, dy)
                                 for d in (step, -step))
        fd = (loss_plus - loss_minus) / (2 * h)
        assert abs(grad[c]) > 1e-3  # a gradient that is really there
        np.testing.assert_allclose(grad[c], fd, rtol=1e-6, atol=1e-9)


def test_x_gradient_is_the_slope_of_the_staircase():
    """The STE slope (1 inside the grid, 0 outside) is the staircase's slope on a scale of many
    steps: a central difference over 20 steps differs from it by at most 1/40."""
    bits, log2_t = 6, 1.0
    s = 2.0 ** (1 - (bits - 1))
    n, p = np_range(bits, True)
    x = np.linspace((n - 40) * s, (p + 40) * s, 2001)

    def y(x):
        return quant.tqt_fake_quant(tf.constant(x), log2_t, bits, True, "half_even").numpy()

    big_h = 20 * s
    fd = (y(x + big_h) - y(x - big_h)) / (2 * big_h)
    _, dx, _ = run_op(x, np.float32(log2_t), np.ones_like(x), num_bits=bits, signed=True,
                      rounding="half_even")
    away = np.minimum(np.abs(x / s - n), np.abs(x / s - p)) > 21  # the difference spans no clip edge
    assert set(dx[away]) == {0.0, 1.0}
    np.testing.assert_allclose(fd[away], dx[away], atol=1 / 40 + 1e-12)


def test_per_row_gradient_is_the_per_tensor_gradient_of_each_row():
    rng = np.random.default_rng(3)
    log2_t = np.array(CHANNEL_LOG2_T, np.float32)[:, None]
    x = make_x(rng, (5, 9), log2_t, 3, True, np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, _, dl = run_op(x, log2_t, dy, num_bits=3, signed=True, rounding="half_even")
    assert dl.shape == (5, 1)
    for r in range(5):
        y_r, _, dl_r = run_op(x[r], log2_t[r, 0], dy[r], num_bits=3, signed=True, rounding="half_even")
        np.testing.assert_array_equal(y[r], y_r)
        np.testing.assert_allclose(dl[r, 0], dl_r, rtol=1e-6)


def test_per_channel_gradient_is_the_per_tensor_gradient_of_each_channel():
    rng = np.random.default_rng(2)
    log2_t = np.array(CHANNEL_LOG2_T, np.float32)
    x = make_x(rng, (3, 7, 5), log2_t, 4, True, np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    _, _, dl = run_op(x, log2_t, dy, num_bits=4, signed=True, rounding="half_even")
    assert dl.shape == (5,)
    for c in range(5):
        _, _, dl_c = run_op(x[..., c], log2_t[c], dy[..., c], num_bits=4, signed=True,
                            rounding="half_even")
        np.testing.assert_allclose(dl[c], dl_c, rtol=1e-6)


# ---- execution modes ------------------------------------------------------------------------


def site_step(site, x):
    """y, dL/dx and dL/dlog2_t for L = sum(y * (1 - x)): an upstream gradient that depends only
    on the element (so it splits across replicas like x), computed exactly in every mode."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = site(x)
        loss = tf.reduce_sum(y * tf.stop_gradient(1.0 - x))
    dx, dl = tape.gradient(loss, [x, site.log2_t])
    return y, dx, dl


@pytest.mark.parametrize("channels", [5, None])  # per channel: the reference path; per tensor: fused
def test_eager_function_and_mirrored_strategy_agree(two_cpus, channels):
    log2_t0 = np.array(CHANNEL_LOG2_T if channels else CHANNEL_LOG2_T[0], np.float32)
    x = make_x(np.random.default_rng(3), (8, 5), log2_t0, 4, True, np.float32)
    x = tf.constant(x)
    site = quant.QuantSite("encoder/block_1/ffn/weight", "weight", 4, channels=channels)
    site.log2_t.assign(log2_t0)
    eager = site_step(site, x)
    graph = tf.function(site_step)(site, x)

    strategy = tf.distribute.MirroredStrategy(two_cpus)
    with strategy.scope():
        mirrored_site = quant.QuantSite("encoder/block_1/ffn/weight", "weight", 4, channels=channels)
        mirrored_site.log2_t.assign(log2_t0)
    halves = tf.split(x, 2)
    x_per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: halves[ctx.replica_id_in_sync_group])

    @tf.function
    def distributed_step(x):
        def replica_step(x):
            y, dx, dl = site_step(mirrored_site, x)
            quant.clamp_log2_t([mirrored_site], lo=-2.0)  # an update in replica context
            return y, dx, dl
        return strategy.run(replica_step, args=(x,))

    y_r, dx_r, dl_r = distributed_step(x_per_replica)
    mirrored = (tf.concat(strategy.experimental_local_results(y_r), 0),
                tf.concat(strategy.experimental_local_results(dx_r), 0),
                tf.add_n(strategy.experimental_local_results(dl_r)))  # log2_t's gradient is a sum

    for got in (graph, mirrored):
        np.testing.assert_array_equal(got[0], eager[0])
        np.testing.assert_array_equal(got[1], eager[1])
        np.testing.assert_allclose(got[2], eager[2], rtol=1e-5, atol=1e-5)
    for value in mirrored_site.log2_t.values:
        np.testing.assert_array_equal(value, np.maximum(log2_t0, np.float32(-2.0)))


# ---- training the threshold -----------------------------------------------------------------


def test_adam_moves_the_threshold_toward_less_clipping():
    x = tf.constant(np.random.default_rng(4).normal(size=4096), tf.float32)
    site = quant.QuantSite("decoder/output_input", "activation", num_bits=4)
    site.log2_t.assign(-2.0)  # threshold 0.25: clips most of a unit Gaussian
    optimizer = tf.keras.optimizers.Adam(learning_rate=0.1)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(site(x) - x))
        optimizer.apply_gradients([(tape.gradient(loss, site.log2_t), site.log2_t)])
        return loss

    first = float(step())
    for _ in range(40):
        last = float(step())
    assert site.threshold() >= 2.0 and last < 0.1 * first


def sgd_step(site, x, learning_rate):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(site(x) - x))  # a sum: its gradient grows with x.size
    grad = tape.gradient(loss, site.log2_t)
    site.log2_t.assign_sub(learning_rate * grad)
    return grad


def test_clamp_keeps_sgd_from_throwing_the_threshold_away():
    x = tf.constant(np.random.default_rng(5).normal(size=4096), tf.float32)
    thrown, clamped = (quant.QuantSite(f"site_{i}", "activation", 4) for i in range(2))
    for site in (thrown, clamped):
        site.log2_t.assign(4.0)

    sgd_step(thrown, x, 1.0)
    assert thrown.log2_t.numpy() < -100
    assert not np.any(thrown(x).numpy()) and float(sgd_step(thrown, x, 1.0)) == 0  # dead for good

    for _ in range(3):
        sgd_step(clamped, x, 1.0)
        quant.clamp_log2_t([clamped])
        assert fixed_point.LOG2_T_MIN <= clamped.log2_t.numpy() <= fixed_point.LOG2_T_MAX
    assert np.all(np.isfinite(clamped(x).numpy())) and float(sgd_step(clamped, x, 0.0)) != 0


# ---- QuantSite --------------------------------------------------------------------------------


def observed_site(data, role="activation", bits=8):
    """A site that observed `data` in four chunks, and its Observations."""
    site = quant.QuantSite("decoder/block_1/ffn/input", role, bits)
    obs = calibration.observe([site])[site.site_name]
    for chunk in np.array_split(data, 4):
        out = site(tf.constant(chunk, tf.float32))
        np.testing.assert_array_equal(out, chunk.astype(np.float32))  # float pass-through
    assert obs.count() == len(data)
    return site, obs


def calibrated_thresholds(data, **kwargs):
    thresholds = {}
    for method in ("max", "percentile", "mse", "kl"):
        site, obs = observed_site(data, **kwargs)
        calibration.calibrate_site(site, obs, method)
        assert site.observer is None
        thresholds[method] = float(site.threshold())
    return thresholds


def test_calibration_on_gaussian_data():
    data = np.random.default_rng(6).normal(size=50_000)
    site, obs = observed_site(data)
    calibration.calibrate_site(site, obs, "max")
    assert site.log2_t.numpy() == pytest.approx(np.log2(np.abs(data).max()), abs=1e-6)
    percentile, obs = observed_site(data)
    calibration.calibrate_site(percentile, obs, "percentile", percentile=99.0)
    assert percentile.log2_t.numpy() == pytest.approx(np.log2(np.percentile(np.abs(data), 99)), abs=0.01)
    thresholds = calibrated_thresholds(data)
    assert thresholds["max"] >= thresholds["percentile"]
    assert all(2.0 <= t <= 8.0 for t in thresholds.values())  # around 3 to 4.5 sigma, ceiled


def test_search_calibration_clips_heavy_tails():
    rng = np.random.default_rng(7)
    student_t = rng.standard_t(2, size=50_000)  # infinite variance
    for bits in (4, 8):
        thresholds = calibrated_thresholds(student_t, bits=bits)
        assert thresholds["mse"] < thresholds["max"] and thresholds["kl"] < thresholds["max"]
    relu = calibrated_thresholds(np.maximum(rng.normal(size=50_000), 0), role="unsigned", bits=4)
    assert 2.0 <= relu["kl"] <= relu["max"]  # the zeros of a ReLU do not drag KL down (to 1/16)


def test_observations_stay_bounded_and_calibration_needs_them():
    site = quant.QuantSite("decoder/block_1/self_attention/softmax_output", "unsigned")
    obs = calibration.observe([site])[site.site_name]
    with pytest.raises(ValueError, match=r"^site 'decoder/block_1/self_attention/softmax_output': "
                       r"observed no data; cannot calibrate$"):
        calibration.calibrate_site(site, obs, "max")
    site.observer = obs.add  # the failed calibration stopped observing
    rng = np.random.default_rng(8)
    for scale in (1.0, 5.0, 40.0):  # the histogram range has to grow twice
        site(tf.constant(rng.random(40_000) * scale, tf.float32))
    assert obs.count() == 120_000 and obs.sample.size == obs.SAMPLE
    assert obs.top == 64.0 and obs.hist.size == obs.BINS
    calibration.calibrate_site(site, obs, "percentile")
    assert site.observer is None  # calibrated: the site quantizes again and observes no more
    x = tf.constant([0.1, 70.0])
    np.testing.assert_array_equal(site(x), quant.tqt_fake_quant(x, site.log2_t, 8, False, "half_even"))
    assert site(x).numpy()[1] < 70.0 and obs.count() == 120_000


def test_init_weight_site_per_channel():
    rng = np.random.default_rng(9)
    w = rng.normal(size=(64, 3)) * [0.1, 1.0, 10.0] + [0.0, 0.5, 0.0]
    site = quant.QuantSite("encoder/block_1/self_attention/query/weight", "weight", channels=3)
    calibration.init_weight_site(site, w, "max")
    np.testing.assert_allclose(site.log2_t.numpy(), np.log2(np.abs(w).max(0)), rtol=1e-6)
    calibration.init_weight_site(site, tf.constant(w), "3sd")
    np.testing.assert_allclose(site.log2_t.numpy(), np.log2(np.abs(w.mean(0)) + 3 * w.std(0)), rtol=1e-6)
    per_tensor = quant.QuantSite("embedding/weight", "weight")
    calibration.init_weight_site(per_tensor, w, "max")
    assert per_tensor.log2_t.numpy() == pytest.approx(np.log2(np.abs(w).max()))
    calibration.init_weight_site(per_tensor, w)  # "max" is the default
    assert per_tensor.log2_t.numpy() == pytest.approx(np.log2(np.abs(w).max()))
    with pytest.raises(ValueError, match=r"^weight init must be one of max\|3sd\|mse, got 'mean'$"):
        calibration.init_weight_site(site, w, "mean")


def test_set_log2_t_broadcasts_and_clips_to_the_clamp_range():
    site = quant.QuantSite("a/weight", "weight", channels=3)
    site.set_log2_t(1.5)
    np.testing.assert_array_equal(site.log2_t.numpy(), [1.5] * 3)
    site.set_log2_t(np.array([-30.0, 2.25, 99.0]))
    np.testing.assert_array_equal(site.log2_t.numpy(), [fixed_point.LOG2_T_MIN, 2.25, fixed_point.LOG2_T_MAX])
    assert site.log2_t.dtype == tf.float32


@pytest.mark.parametrize("role, frac", [("weight", 7 - 3), ("unsigned", 8 - 3)])
def test_frac_bits_threshold_and_grid(role, frac):
    site = quant.QuantSite("a/b", role)
    site.log2_t.assign(2.3)  # ceil -> 3: threshold 8
    assert site.frac_bits() == frac and site.frac_bits_tensor().numpy() == frac
    assert site.frac_bits().dtype == np.int64 and site.frac_bits_tensor().dtype == tf.int32
    grid = site.grid()
    assert (grid.bits, grid.signed, int(grid.f)) == (8, role == "weight", frac)
    assert site.threshold() == 8.0 and np.exp2(-grid.f.astype(np.float64)) == 2.0**-frac  # the scale s
    assert fixed_point.frac_bits(np.array([2.3, -1.0, -1.5]), 8, True).tolist() == [4, 8, 8]
    f = quant.frac_bits_tensor(tf.constant([2.3, -1.0, -1.5]), 8, False)
    assert f.dtype == tf.int32 and f.numpy().tolist() == [5, 9, 9]


def test_clip_fraction():
    site = quant.QuantSite("a", "activation", num_bits=4)  # log2_t 0: s = 1/8, range [-1, 0.875]
    x = np.array([-1.0, -1.01, 0.875, 0.9, 0.0, 0.5, 3.0, -0.2])
    assert site.clip_fraction(x) == 3 / 8


def test_frozen_site_passes_no_gradient_to_its_threshold():
    site = quant.QuantSite("a", "activation")
    x = tf.constant([0.1, 0.7, 3.0])
    site.frozen = True
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = site(x)
    dx, dl = tape.gradient(y, [x, site.log2_t])
    assert dl is None and dx.numpy().tolist() == [1.0, 1.0, 0.0]


# ---- bias, configuration, factory ---------------------------------------------------------------


def test_quantize_bias_is_integer_at_the_accumulator_scale():
    b = tf.Variable([0.123456, -3.3, 1e-4, 2.5e5])
    frac = tf.constant([10, 3, 12, 14])
    with tf.GradientTape() as tape:
        y = quant.quantize_bias(b, frac)
    q = y.numpy() * 2.0 ** frac.numpy()
    np.testing.assert_array_equal(q, [126, -26, 0, 2**31 - 128])  # round, underflow, int32 clip
    np.testing.assert_array_equal(tape.gradient(y, b), np.ones(4))  # straight through
    y64 = quant.quantize_bias(tf.constant([2.5e5, -2.5e5, -131072.0], tf.float64), 14).numpy()
    # float64 holds both int32 limits: the clip is [-2^31, 2^31 - 1], asymmetric as int32 is
    np.testing.assert_array_equal(y64 * 2.0**14, [2**31 - 1, -(2**31), -(2**31)])


def test_quant_config_from_flags():
    assert quant.QuantConfig.from_flags("none", 4, 4, "half_even", False, []) is None
    overrides = ["*/softmax_output=8", "*attention*=6", "decoder/*/softmax_output=7"]
    config = quant.QuantConfig.from_flags("w4a8", None, None, "half_up", True, overrides)
    assert (config.wbits, config.abits, config.rounding, config.per_channel) == (4, 8, "half_up", True)
    assert config.bits_for("encoder/block_1/ffn/weight", "weight") == 4
    assert config.bits_for("encoder/block_1/ffn/input", "unsigned") == 8
    assert config.bits_for("encoder/block_1/self_attention/softmax_output", "unsigned") == 6
    assert config.bits_for("decoder/block_2/self_attention/softmax_output", "unsigned") == 7  # last wins
    assert quant.QuantConfig.from_flags("w8a8", 6, None, "floor", False, []).wbits == 6
    for bad in ("softmax", "=8", "x=eight", "x=1", "x=17"):
        with pytest.raises(ValueError, match="--quant_override"):
            quant.QuantConfig.from_flags("w8a8", None, None, "half_even", False, [bad])
    with pytest.raises(ValueError, match="--quant"):
        quant.QuantConfig.from_flags("int8", None, None, "half_even", False, [])


def test_tqt_sites():
    sites = quant.TQTSites(quant.QuantConfig(wbits=4, abits=8, per_channel=True,
                                             overrides=[("*/softmax_output", 6)]))
    w = sites.site("encoder/block_1/ffn/weight", "weight", channels=16)
    x = sites.site("encoder/block_1/ffn/input", "activation", channels=16)  # per-channel: weights only
    p = sites.site("encoder/block_1/self_attention/softmax_output", "unsigned")
    assert w.log2_t.shape == [16] and x.log2_t.shape == []
    assert (w.num_bits, x.num_bits, p.num_bits) == (4, 8, 6)
    assert not p.signed and w.site_name == "encoder/block_1/ffn/weight"
    assert len(sites.trainable_variables) == 3
    with pytest.raises(ValueError, match="encoder/block_1/ffn/weight"):
        sites.site("encoder/block_1/ffn/weight", "weight")

    w.log2_t.assign(np.linspace(-2, 1, 16))
    b = sites.bias(tf.random.normal([16]), x, w)
    frac = x.frac_bits() + w.frac_bits()
    q = b.numpy() * 2.0**frac
    np.testing.assert_array_equal(q, np.round(q))


@pytest.mark.parametrize("bits, rounding, message", [
    (1, "half_even", "num_bits"), (17, "half_even", "num_bits"), (8.0, "half_even", "num_bits"),
    (8, "nearest", "rounding"),
])
def test_bad_bits_and_rounding_are_rejected(bits, rounding, message):
    for op in OPS.values():
        with pytest.raises(ValueError, match=message):
            op(tf.zeros([2]), 0.0, bits, True, rounding)
    with pytest.raises(ValueError, match=message):
        quant.QuantSite("a", "activation", bits, rounding)


def test_integer_only_config_widths_and_the_residual_role():
    config = quant.QuantConfig.from_flags("w8a8", None, None, "half_even", False,
                                          ["*/ln2/input=12"], integer_only=True, residual_bits=14)
    assert config.integer_only and config.residual_bits == 14
    names = site_names.layer_norm(site_names.block_names("encoder", 0).norms[0])
    assert names == ("encoder/block_1/ln1/input", "encoder/block_1/ln1/gamma", "encoder/block_1/ln1/beta",
                     "encoder/block_1/ln1/output")
    assert config.bits_for(names.input, "residual") == 14
    assert config.bits_for(names.gamma, "weight") == 8
    assert config.bits_for("encoder/block_1/ln2/input", "residual") == 12  # overrides still win
    assert config.bits_for(site_names.EMBEDDING_SUM, "residual") == 14
    assert config.bits_for(names.gamma, "weight", default=14) == 14
    assert quant.QuantSite(names.input, "residual", 14).signed
    with pytest.raises(ValueError, match="--integer_only needs a --quant preset"):
        quant.QuantConfig.from_flags("none", integer_only=True)
    with pytest.raises(ValueError, match="--normalization reciprocal needs --integer_only"):
        quant.QuantConfig.from_flags("w8a8", normalization="reciprocal")
    assert quant.QuantConfig.from_flags("w8a8", integer_only=True,
                                        normalization="reciprocal").normalization == "reciprocal"
    with pytest.raises(ValueError, match="num_bits"):
        quant.QuantConfig(residual_bits=17)


# ---- the one-pass backward kernel (csrc/quant_grad.cc) ----


def test_grad_kernel_is_built_where_a_compiler_is():
    """make test builds it: a loader that silently found nothing would leave QAT on the slow path."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler: csrc/quant_grad.cc cannot be built here")
    assert quant.GRAD_KERNEL is not None, f"{quant.GRAD_KERNEL_PATH} did not load: run make kernel"
    assert quant.load_grad_kernel("/nonexistent/_quant_grad.so") is None


@pytest.mark.skipif(quant.GRAD_KERNEL is None, reason="csrc/quant_grad.cc is not built (make kernel)")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_kernel_on_a_tensor_split_across_threads(dtype):
    """77,100 elements: several blocks of the thread pool, chunks with a tail. dL/dx exactly and
    dL/dlog2_t to float rounding as NumPy computes them, and as TF's kernels do."""
    rng = np.random.default_rng(5)
    log2_t = np.float32(SCALAR_LOG2_T)
    x = make_x(rng, (257, 300), log2_t, 8, True, dtype)
    dy = rng.normal(size=x.shape).astype(dtype)
    y, dx, dl = run_op(x, log2_t, dy, quant.tqt_fake_quant_fused, num_bits=8, signed=True,
                       rounding="half_even")
    y_ref, dx_ref, dl_ref = np_tqt(x, log2_t, 8, True, "half_even", dy)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(dl, dl_ref, rtol=1e-5)
    with quant.without_grad_kernel():
        tf_kernels = run_op(x, log2_t, dy, quant.tqt_fake_quant_fused, num_bits=8, signed=True,
                            rounding="half_even")
    np.testing.assert_array_equal(dx, tf_kernels[1])
    np.testing.assert_allclose(dl, tf_kernels[2], rtol=1e-5)


@pytest.mark.skipif(quant.GRAD_KERNEL is None, reason="csrc/quant_grad.cc is not built (make kernel)")
def test_grad_kernel_refuses_mismatched_shapes():
    x = tf.zeros([4, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="dy, x and y must have one shape"):
        quant.GRAD_KERNEL.tqt_fake_quant_grad(tf.zeros([4, 2]), x, x, tf.constant(-1.0), tf.constant(1.0))
