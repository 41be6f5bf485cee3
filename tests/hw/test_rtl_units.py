"""Each RTL unit (hw/rtl/) against the Python spec (integer/kernels.py) on random and edge inputs, in
cocotb on Icarus: every output integer and every kernel step must be equal (hw/bench/*_cocotb.py
count the rows or elements that are). NumPy only."""

from __future__ import annotations

import numpy as np
import pytest

from hw import params, sim
from integer import accumulation, kernels

ROUNDINGS = ("half_even", "half_up", "floor")
pytestmark = pytest.mark.usefixtures("hw_tools")


def run(toplevel: str, module: str, parameters: dict, groups: list[dict], work) -> dict:
    result = sim.run_cocotb(toplevel, module, parameters, groups, work)
    assert result["failed"] == 0, result["mismatches"]
    return result


def elementwise(inputs: dict, expect: np.ndarray, bits: int, signed: bool) -> dict:
    return {**{f"in_{k}": v for k, v in inputs.items()}, "expect_out": expect, "out_bits": bits,
            "out_signed": int(signed)}


# ---- requantize, ReLU, residual, embedding sum ------------------------------------------------------


def requantize_cases(rng, in_bits: int, out_bits: int, signed: bool, rounding: str, max_left: int) -> dict:
    """Random q and shifts, and the edges: every tie (q an odd multiple of 2^(k-1), both signs), k = 0,
    shifts of in_bits and beyond (the unit caps them), every left shift, both ends of q, the clip."""
    top = 1 << (in_bits - 1)
    q = [rng.integers(-top, top, 400)]
    k = [rng.integers(-max_left, in_bits + 3, 400)]
    for shift in range(1, in_bits - 1):
        ties = (2 * rng.integers(-(top >> shift), top >> shift, 6) + 1) << (shift - 1)
        q.append(ties)
        k.append(np.full(ties.size, shift))
    extremes = np.array([-top, top - 1, -1, 0, 1])
    for shift in (0, in_bits - 1, in_bits, in_bits + 1, 40, -max_left):
        q.append(extremes)
        k.append(np.full(extremes.size, shift))
    q, k = np.concatenate(q), np.concatenate(k)
    return elementwise({"q": q, "shift": k}, kernels.requantize(q, k, out_bits, signed, rounding), out_bits,
                       signed)


@pytest.mark.parametrize("rounding,signed", [(r, True) for r in ROUNDINGS] + [("half_even", False)])
def test_requantize(rounding, signed, tmp_path):
    rng = np.random.default_rng(1)
    group = requantize_cases(rng, 22, 8, signed, rounding, max_left=4)
    result = run("tqt_shift_round", "elementwise_cocotb",
                 {"IN_W": 22, "OUT_W": 8, "OUT_SIGNED": int(signed),
                  "ROUNDING": params.ROUNDING_CODES[rounding],
                  "SHIFT_W": params.SHIFT_W, "MAX_LEFT": 4}, [group], tmp_path)
    assert result["passed"] == group["expect_out"].size


def test_relu_residual_and_embedding_sum(tmp_path):
    rng = np.random.default_rng(2)
    acc = np.concatenate([rng.integers(-(1 << 20), 1 << 20, 200), [-(1 << 20), (1 << 20) - 1, 0, -1, 1]])
    result = run("tqt_relu", "elementwise_cocotb", {"W": 21},
                 [elementwise({"acc": acc}, np.maximum(acc, 0), 22, True)], tmp_path / "relu")
    assert result["passed"] == acc.size

    # residual: x on f_x, a on f_a; both aligned left onto g, one rounding onto the 16-bit site
    n = 300
    x = np.concatenate([rng.integers(-(1 << 15), 1 << 15, n), [-(1 << 15), (1 << 15) - 1]])
    a = np.concatenate([rng.integers(-(1 << 24), 1 << 24, n), [-(1 << 24), (1 << 24) - 1]])
    x_shift, a_shift = rng.integers(0, 6, x.size), rng.integers(0, 3, x.size)
    shift = rng.integers(-2, 12, x.size)
    total = (x << x_shift) + (a << a_shift)
    sum_bits = accumulation.signed_bits(int(np.abs(total).max()))
    for rounding in ("half_even", "floor"):
        expect = kernels.requantize(total, shift, 16, True, rounding)
        result = run("tqt_residual", "elementwise_cocotb",
                     {"X_W": 16, "A_W": 25, "SUM_W": sum_bits, "OUT_W": 16, "SHIFT_W": params.SHIFT_W,
                      "ROUNDING": params.ROUNDING_CODES[rounding]},
                     [elementwise({"x": x, "a": a, "x_shift": x_shift, "a_shift": a_shift, "shift": shift},
                                  expect, 16, True)], tmp_path / f"residual_{rounding}")
        assert result["passed"] == x.size

    lookup = np.concatenate([rng.integers(-(1 << 11), 1 << 11, 100), [(1 << 11) - 1, -(1 << 11), 2000]])
    position = np.concatenate([rng.integers(-(1 << 11), 1 << 11, 100), [(1 << 11) - 1, -(1 << 11), -5]])
    result = run("tqt_embedding_sum", "elementwise_cocotb", {"W": 12},
                 [elementwise({"lookup": lookup, "position": position}, kernels.clip_to(lookup + position,
                                                                                        12, True),
                              12, True)], tmp_path / "embedding")
    assert result["passed"] == lookup.size


# ---- the divider and the square root ----------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_div_round_and_its_ties(rounding, tmp_path):
    """R(a / b) for both signs of a: random cases, every exact tie (2r = b: a = (2t + 1) b / 2 for even
    b), remainders 0 and b - 1, and |a| at the quotient bound (|a| < b 2^Q_W)."""
    rng = np.random.default_rng(8)
    q_w, den_w = 10, 12
    b = rng.integers(1, 1 << den_w, 300)
    a = rng.integers(-(1 << q_w), 1 << q_w, 300) * b + rng.integers(0, 1 << den_w, 300) % b
    even = 2 * rng.integers(1, 1 << (den_w - 1), 100)
    ties = (2 * rng.integers(-(1 << (q_w - 1)), 1 << (q_w - 1), 100) + 1) * (even // 2)
    top = (1 << den_w) - 1
    edges_a = np.array([0, 1, -1, top * (1 << q_w) - 1, -(top * (1 << q_w) - 1), 5 * top, -5 * top, top - 1])
    a = np.concatenate([a, ties, edges_a])
    b = np.concatenate([b, even, np.full(edges_a.size, top)])
    assert np.all(np.abs(a) < b << q_w)
    group = {"in_a": a, "in_b": b, "expect_out": kernels.div_round(a, b, rounding), "out_port": "quotient",
             "out_signed": 1}
    result = run("tqt_div_round", "sequential_cocotb", {"NUM_W": q_w + den_w + 1, "DEN_W": den_w, "Q_W": q_w,
                                                        "ROUNDING": params.ROUNDING_CODES[rounding]},
                 [group], tmp_path)
    assert result["passed"] == a.size


def test_isqrt_is_the_floor_of_the_square_root(tmp_path):
    """floor(sqrt(n)) over the 2K-bit range: 0, 1, squares and their neighbours, the top, random n."""
    rng = np.random.default_rng(9)
    root_w = 24
    squares = rng.integers(0, 1 << root_w, 100) ** 2
    n = np.concatenate([[0, 1, 2, 3, 4, (1 << (2 * root_w)) - 1, 1 << (2 * root_w - 2)], squares, squares - 1,
                        squares + 1, rng.integers(0, 1 << (2 * root_w), 200)])
    n = np.clip(n, 0, (1 << (2 * root_w)) - 1)
    group = {"in_n": n, "expect_out": kernels.isqrt(n), "out_port": "root", "out_signed": 0}
    result = run("tqt_isqrt", "sequential_cocotb", {"ROOT_W": root_w}, [group], tmp_path)
    assert result["passed"] == n.size


# ---- the MAC row and argmax -------------------------------------------------------------------------


def test_mac_row_is_exact_at_its_proven_width(tmp_path):
    """acc = x @ w + bias at the width accumulation.accumulator_bound gives, reached by the extreme
    operands (every product at its largest, both signs), and an unsigned (ReLU) input; more columns than
    lanes (a partial last lane group); q requantized with one shift per column (per-channel grids)."""
    rng = np.random.default_rng(3)
    k, n = 24, 19
    x = rng.integers(-128, 128, (5, k))
    x[0], x[1] = -128, 127
    w = rng.integers(-128, 128, (k, n))
    w[:, 0], w[:, 1] = -128, 127
    bias = rng.integers(-1000, 1000, n)
    bound = k * 128 * 128 + 1000
    acc_bits = accumulation.signed_bits(bound)
    shifts = rng.integers(-1, 14, n)
    groups = [{"x": x, "w": w, "bias": bias, "shift": shifts, "expect_acc": x @ w + bias,
               "expect_q": kernels.requantize(x @ w + bias, shifts, 8, True, "half_even")}]
    unsigned_x = rng.integers(0, 256, (3, k))
    unsigned_x[0] = 255
    groups.append({"x": unsigned_x, "w": w, "bias": bias, "shift": 11, "expect_acc": unsigned_x @ w + bias,
                   "expect_q": kernels.requantize(unsigned_x @ w + bias, 11, 8, True, "half_even")})
    result = run("mac_bench", "mac_cocotb", {"ROWS": 5, "K": k, "N": n, "LANES": 8, "X_W": 9, "W_W": 8,
                                             "ACC_W": acc_bits + 1, "OUT_W": 8, "ROUNDING": 2, "MAX_LEFT": 1},
                 groups, tmp_path)
    assert result["passed"] == 8
    assert int(np.abs(groups[0]["expect_acc"]).max()) > 1 << (acc_bits - 2)  # the width is needed


def test_argmax_takes_the_first_maximum(tmp_path):
    rng = np.random.default_rng(4)
    logits = rng.integers(-50, 50, (8, 30))
    logits[1] = 7  # all equal: index 0
    logits[2, [3, 17]] = 200  # a tie: the earlier
    logits[3] = -(1 << 23)
    logits[3, 29] = (1 << 23) - 1  # the last position, extremes
    result = run("argmax_bench", "argmax_cocotb", {"ROWS": 8, "N": 30, "W": 24, "INDEX_W": 5},
                 [{"logits": logits, "expect_out": np.argmax(logits, axis=-1)[:, None]}], tmp_path)
    assert result["passed"] == 8


# ---- LayerNorm -------------------------------------------------------------------------------------


def layer_norm_group(q, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding,
                     normalization="exact") -> dict:
    steps: dict = {}
    out = kernels.layer_norm(q, gamma, beta, eps_q, f_gamma, f_out, out_bits, rounding, steps=steps,
                             normalization=normalization)
    return {"q": q, "gamma": gamma, "beta": beta, "eps_q": eps_q, "out_shift": f_gamma + kernels.LN_F - f_out,
            "out_bits": out_bits, "expect_out": out, **{f"expect_{k}": v for k, v in steps.items()}}


@pytest.mark.parametrize("rounding,normalization", [(r, "exact") for r in ROUNDINGS]
                         + [(r, "reciprocal") for r in ROUNDINGS])
def test_layer_norm_rows(rounding, normalization, tmp_path):
    """Random rows and the edges: a constant row with eps_q = 0 (W = 0: D = 1, out = R(beta)) and
    with eps_q > 0, the largest W (alternating extremes), one outlier, and output shifts of both
    signs (a left shift onto a finer output grid); both normalizations (the reciprocal's r compared
    too)."""
    rng = np.random.default_rng(5)
    d, bits = 48, 16
    top = 1 << (bits - 1)
    q = rng.integers(-top, top, (8, d))
    q[1] = 1234
    q[2] = np.where(np.arange(d) % 2, top - 1, -top)
    q[3] = 0
    q[3, 5] = -top
    q[4] = rng.integers(-3, 4, d)
    gamma = rng.integers(-(1 << 15), 1 << 15, d)  # a 16-bit gamma site
    gamma[0] = -(1 << 15)
    beta = rng.integers(-(1 << 40), 1 << 40, d)
    constant = q[1:2]
    groups = [layer_norm_group(q, gamma, beta, 3, 14, 12, bits, rounding, normalization),
              layer_norm_group(constant, gamma, beta, 0, 14, 12, bits, rounding, normalization),  # W = 0
              layer_norm_group(q[:3], gamma, beta, 1 << 32, 14, 31, bits, rounding,
                               normalization),  # eps_q 2^32
              layer_norm_group(q[:3], gamma, beta, 3, 12, 41, bits, rounding, normalization)]  # a left shift
    assert groups[1]["expect_W"].max() == 0 and groups[2]["out_shift"] < 0 and groups[3]["out_shift"] < 0
    assert ("expect_r" in groups[0]) == (normalization == "reciprocal")
    hw = params.layer_norm_params(d, bits, 16, 1 << 40, 1 << 32, bits, rounding, normalization=normalization)
    result = run("layer_norm_bench", "layer_norm_cocotb", {**hw, "ROWS": 8}, groups, tmp_path)
    assert result["passed"] == 8 + 1 + 3 + 3
    assert len(set(result["cycles"])) == 1  # every row of d values takes the same cycles


@pytest.mark.parametrize("normalization", ["exact", "reciprocal"])
def test_layer_norm_with_a_negative_k(normalization, tmp_path):
    """d = 1024 alternating extremes: W >= 2^2K, so k < 0 (W shifted right before the isqrt)."""
    d, top = 1024, 1 << 15
    q = np.where(np.arange(d) % 2, top - 1, -top)[None].repeat(2, 0)
    q[1, :10] = 0
    gamma = np.full(d, 1 << 14)
    beta = np.arange(d) << 20
    group = layer_norm_group(q, gamma, beta, 7, 14, 12, 16, "half_even", normalization)
    assert group["expect_k"].min() < 0
    hw = params.layer_norm_params(d, 16, 16, int(beta.max()), 7, 16, "half_even", normalization=normalization)
    result = run("layer_norm_bench", "layer_norm_cocotb", {**hw, "ROWS": 2}, [group], tmp_path)
    assert result["passed"] == 2


# ---- softmax ---------------------------------------------------------------------------------------


def softmax_group(scores, visible, f, out_bits, rounding, m, x_bits, normalization="exact") -> dict:
    steps: dict = {}
    out, _ = kernels.softmax_with_sums(scores, f, visible, out_bits, rounding, kernels.EXP_F, m, steps)
    if normalization == "reciprocal":
        out = kernels.normalize_reciprocal(steps["e"], out_bits, rounding, steps)
    return {"scores": scores, "visible": visible.astype(np.uint8), "shift": f - kernels.EXP_F,
            "clamp": params.clamp_setting(kernels.exp_clamp(f, m), x_bits), "expect_out": out,
            **{f"expect_{k}": v for k, v in steps.items()}}


@pytest.mark.parametrize("rounding,m,normalization", [("half_even", 8, "exact"), ("half_up", 64, "exact"),
                                                      ("floor", 1, "exact"), ("half_even", 8, "reciprocal"),
                                                      ("half_up", 64, "reciprocal"), ("floor", 1,
                                                                                      "reciprocal")])
def test_softmax_rows(rounding, m, normalization, tmp_path):
    """Random rows and the edges: a fully masked row (all zeros), one visible key (p = 1, clipped to
    2^b - 1), equal scores, scores far below the top (clamped, z > 62: e = 0), and the three kinds of
    input grid: f < F (a left shift), f = F, f > F (the half-up shift, with ties)."""
    rng = np.random.default_rng(6)
    length, bits, out_bits = 20, 20, 8
    score_max = 1 << (bits - 1)
    scores = rng.integers(-(1 << 12), 1 << 12, (7, length))
    visible = rng.random((7, length)) < 0.8
    visible[0] = True
    visible[1] = False
    visible[2] = False
    visible[2, 7] = True
    scores[3] = 55
    scores[4, :5] = score_max - 1
    scores[4, 5:] = -score_max
    scores[5] = (rng.integers(-200, 1, length) << 4) | 8  # half-way points once shifted by 4 (f = F + 4)
    hw = params.softmax_params(score_max, bits, [4, kernels.EXP_F, kernels.EXP_F + 4], 32, out_bits, rounding,
                               kernels.EXP_F, m, normalization)
    groups = [softmax_group(scores, visible, f, out_bits, rounding, m, hw["X_W"], normalization)
              for f in (4, kernels.EXP_F, kernels.EXP_F + 4)]
    assert groups[0]["expect_z"].max() > 62 and groups[1]["expect_out"][1].max() == 0
    result = run("softmax_bench", "softmax_cocotb", {**hw, "ROWS": 7, "L_MAX": 32}, groups, tmp_path)
    assert result["passed"] == 3 * 7


# ---- the bench itself: a wrong expectation is reported ----------------------------------------------


def test_a_wrong_integer_fails_the_bench(tmp_path):
    """The benches can fail: one expected LayerNorm step and one requantized value changed by 1."""
    rng = np.random.default_rng(7)
    group = layer_norm_group(rng.integers(-500, 500, (2, 8)), np.full(8, 1 << 13), np.zeros(8, np.int64), 1,
                             13, 12, 16, "half_even")
    group["expect_n"] = group["expect_n"].copy()
    group["expect_n"][1, 3] += 1
    hw = params.layer_norm_params(8, 16, 16, 1, 1, 16, "half_even")
    result = sim.run_cocotb("layer_norm_bench", "layer_norm_cocotb", {**hw, "ROWS": 2}, [group],
                            tmp_path / "ln")
    assert (result["passed"], result["failed"]) == (1, 1) and result["mismatches"][0]["steps"] == ["n"]
    q = rng.integers(-1000, 1000, 50)
    expect = kernels.requantize(q, 3, 8, True, "half_even")
    expect[10] += 1
    result = sim.run_cocotb("tqt_shift_round", "elementwise_cocotb",
                            {"IN_W": 11, "OUT_W": 8, "OUT_SIGNED": 1, "ROUNDING": 2, "SHIFT_W": 8,
                             "MAX_LEFT": 0},
                            [elementwise({"q": q, "shift": np.full(50, 3)}, expect, 8,
                                         True)], tmp_path / "rq")
    assert (result["passed"], result["failed"]) == (49, 1)


def test_a_relative_work_folder(tmp_path, monkeypatch):
    """The simulator runs in hw/bench/: a work folder given relative to the caller still works."""
    monkeypatch.chdir(tmp_path)
    acc = np.arange(-5, 6)
    result = run("tqt_relu", "elementwise_cocotb", {"W": 8},
                 [elementwise({"acc": acc}, np.maximum(acc, 0), 9, True)], "relative/work")
    assert result["passed"] == acc.size and (tmp_path / "relative" / "work" / "results.json").exists()
