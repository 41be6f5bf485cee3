"""Activation calibration (integer/calibration.py; docs/tqt.md, "Calibration") against independent
references: a plain-loop KL-J threshold search written from the docstrings, hand-worked histograms,
np.percentile and a NumPy brute force over power-of-two thresholds for MSE. Sites observe through
calibration.observe and are calibrated by calibration.calibrate_site."""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
from integer import calibration, fixed_point

BINS = calibration.Observations.BINS
FLOOR = 1e-12  # the "tiny floor" on Q; its value decides J wherever Q is empty, so it must match


# ---- the reference KL-J search ------------------------------------------------------------------


def magnitude_levels(num_bits, signed):
    """Grid steps between 0 and the threshold: a signed grid spends one bit on the sign."""
    return 2 ** (num_bits - 1) if signed else 2**num_bits


def ref_kl_j(hist, i, levels):
    """J = KL(P||Q) + KL(Q||P) over P's support, from the definition in calibration.kl_j's docstring.

    P: bins 0..i-1 of hist, everything from bin i on added to bin i-1.
    Q: bins 0..i-1 cut into `levels` groups, group g holding the bins j with g <= j*levels/i < g+1;
       each group's unclipped mass is shared equally by its bins where P > 0.
    Returns inf when Q has no mass at all (everything clipped): J is undefined there.
    """
    hist = [float(h) for h in hist]
    p = hist[:i]
    p[i - 1] += sum(hist[i:])
    q = [0.0] * i
    for g in range(levels):
        first = -(-g * i // levels)  # ceil(g * i / levels)
        end = -(-(g + 1) * i // levels)
        mass = sum(hist[first:end])
        kept = [j for j in range(first, end) if p[j] > 0]
        for j in kept:
            q[j] = mass / len(kept)
    support = [j for j in range(i) if p[j] > 0]
    p_total = sum(p[j] for j in support)
    q_total = sum(q[j] for j in support)
    if q_total == 0:
        return math.inf
    kl_pq = kl_qp = 0.0
    for j in support:
        pj = p[j] / p_total
        qj = max(q[j] / q_total, FLOOR)
        kl_pq += pj * math.log(pj / qj)
        kl_qp += qj * math.log(qj / pj)
    return kl_pq + kl_qp


def ref_kl_costs(hist, levels):
    """{i: J} for every candidate cut i, from `levels` bins up to just past the last nonzero bin;
    empty when the grid has at least as many levels as there are occupied bins (keep the max)."""
    nonzero = [j for j, h in enumerate(hist) if h > 0]
    occupied = nonzero[-1] + 1 if nonzero else 0
    if occupied <= levels:
        return {}
    hist = list(hist[:occupied])
    return {i: ref_kl_j(hist, i, levels) for i in range(levels, occupied + 1)}


def ref_kl_threshold(hist, num_bits, signed, bin_width, max_value):
    costs = ref_kl_costs(hist, magnitude_levels(num_bits, signed))
    if not costs:
        return max_value
    best = None
    for i, cost in costs.items():  # increasing i: a tie keeps the smaller threshold
        if best is None or cost < costs[best]:
            best = i
    return best * bin_width


def hand_built(counts, bin_width=1.0, max_value=None):
    """Observations holding `counts` in its first bins; max defaults to inside the last one."""
    obs = calibration.Observations(seed=0)
    obs.hist[: len(counts)] = counts
    obs.top = bin_width * BINS
    last = int(np.flatnonzero(obs.hist)[-1]) if obs.hist.any() else 0
    obs.max = (last + 0.5) * bin_width if max_value is None else max_value
    return obs


def padded(counts, length=BINS):
    hist = np.zeros(length)
    hist[: len(counts)] = counts
    return hist


# ---- kl_j on hand-worked P and Q ---------------------------------------------------------------

CLIP_WINS = [4, 1, 0, 0, 0, 1]  # a decreasing bulk and one far outlier
# levels 2, i 6 (the max): P = [4,1,0,0,0,1]/6; groups {0,1,2} {3,4,5}, Q on P > 0 = [2.5,2.5,1]/6;
#   J = (1.5/6) ln(4/2.5) + (-1.5/6) ln(1/2.5) = ln(4)/4
# i 2: P = [4, 1+1]/6, Q = [4, 1]/5; J = (-2/15) ln(5/6) + (2/15) ln(5/3) = (2/15) ln 2
# i 3, 4, 5: the outlier folds into a group with no unclipped mass: Q floored there, J > 4
# so the cut at 2 bins wins.
MAX_WINS = [1, 1, 1]
# levels 2: i 3 gives groups {0,1} {2}, Q = P, J = 0; i 2 gives P = [1,2]/3, Q = [1,1]/2,
# J = (1/6) ln(4/3) - (1/6) ln(2/3) = (1/6) ln 2 > 0: the max wins.
INTERIOR_WINS = [2, 2, 4, 1]
# levels 2. i 2: P = [2, 7]/9, Q = [1, 1]/2, J = (5/18) ln(14/9 / (4/9)) = (5/18) ln(3.5)
# i 3: groups {0,1} {2}: P = [2,2,5]/9, Q = [2,2,4]/8, J = 2 (1/36) ln(9/8) + (1/18) ln(10/9)
#   = (1/18) ln(5/4)
# i 4: groups {0,1} {2,3}: P = [2,2,4,1]/9, Q = [2,2,2.5,2.5]/9, J = ln(4)/6
# 0.0124 < 0.231 < 0.348: the interior cut 3 wins.
SPARSE = [1, 0, 1, 1]
# levels 2, i 4: groups {0,1} {2,3}; group 0's mass sits on bin 0 alone (P = 0 on bin 1), so Q = P
# and J = 0. Spreading it over both bins would give Q = [0.5, 1, 1]/2.5 and J > 0.


@pytest.mark.parametrize(
    "counts, i, expected",
    [
        (CLIP_WINS, 6, math.log(4) / 4),
        (CLIP_WINS, 2, 2 / 15 * math.log(2)),
        (MAX_WINS, 3, 0.0),
        (MAX_WINS, 2, math.log(2) / 6),
        (INTERIOR_WINS, 2, 5 / 18 * math.log(3.5)),
        (INTERIOR_WINS, 3, math.log(5 / 4) / 18),
        (INTERIOR_WINS, 4, math.log(4) / 6),
        (SPARSE, 4, 0.0),
        # i 3: P = [4,1,1]/6, Q = [0.5, 0.5, 0] floored: the outlier's term dominates
        (CLIP_WINS, 3, (1 / 6) * math.log(4 / 3) + (1 / 3) * math.log(3)
         + (1 / 6 - FLOOR) * math.log(1 / 6 / FLOOR)),
    ],
)
def test_kl_j_on_hand_worked_cases(counts, i, expected):
    for hist in (padded(counts, len(counts)), padded(counts)):  # trailing empty bins change nothing
        assert calibration.kl_j(hist, i, 2) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert ref_kl_j(counts, i, 2) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_kl_j_is_symmetric_not_one_sided():
    # CLIP_WINS at i = 2: KL(P||Q) = (2/3) ln(5/6) + (1/3) ln(5/3) = 0.0487, J = 0.0924
    one_sided = 2 / 3 * math.log(5 / 6) + 1 / 3 * math.log(5 / 3)
    j = calibration.kl_j(padded(CLIP_WINS), 2, 2)
    assert j == pytest.approx(2 / 15 * math.log(2), rel=1e-12)
    assert abs(j - one_sided) > 0.04


def test_kl_j_groups_by_levels():
    # P = [1,1,3,3,1,1,3,3]/16 at i 8. 4 levels, groups of 2 bins: each group is flat, Q = P, J = 0.
    # 2 levels, groups of 4: Q = 1/8 everywhere; four bins give (1/16) ln 2 and four (1/16) ln 1.5,
    # J = ln(3)/4.
    counts = [1, 1, 3, 3, 1, 1, 3, 3]
    assert calibration.kl_j(padded(counts), 8, 4) == pytest.approx(0.0, abs=1e-15)
    assert calibration.kl_j(padded(counts), 8, 2) == pytest.approx(math.log(3) / 4, rel=1e-12)
    assert ref_kl_j(counts, 8, 2) == pytest.approx(math.log(3) / 4, rel=1e-12)


@st.composite
def kl_inputs(draw, max_levels=16):
    """(hist, levels): levels a power of two, the last bin nonzero, and some mass below `levels`
    bins (test_kl_keeps_the_max_of_data_with_nothing_small covers data with none there)."""
    levels = draw(st.sampled_from([lv for lv in (2, 4, 8, 16, 32, 64, 128, 256) if lv <= max_levels]))
    occupied = draw(st.integers(1, 3 * levels + 8))
    count = st.one_of(st.just(0), st.integers(1, 9), st.integers(10, 100_000))
    counts = draw(st.lists(count, min_size=occupied, max_size=occupied))
    counts[-1] = max(counts[-1], 1)
    low = draw(st.integers(0, min(levels, occupied) - 1))
    counts[low] = max(counts[low], 1)
    return counts, levels


@settings(max_examples=300, deadline=None)
@given(kl_inputs(), st.data())
def test_kl_j_matches_reference_on_random_histograms(inputs, data):
    counts, levels = inputs
    if len(counts) < levels:
        return  # no cut is searched below `levels` bins
    i = data.draw(st.integers(levels, len(counts)))
    if sum(counts[:i]) == 0:
        return
    expected = ref_kl_j(counts, i, levels)
    assert calibration.kl_j(padded(counts), i, levels) == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ---- kl_threshold -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "counts, num_bits, signed, bin_width, expected_bins",
    [
        (CLIP_WINS, 2, True, 1.0, 2),  # 2 levels: clipping wins (worked above)
        (CLIP_WINS, 2, True, 1 / 256, 2),  # the threshold is in bins of the histogram's width
        (MAX_WINS, 2, True, 1.0, 3),  # the max wins: the upper edge of the last occupied bin
        (INTERIOR_WINS, 2, True, 0.5, 3),  # an interior cut wins
        (SPARSE, 2, True, 1.0, 4),  # the max wins though bin 1 is empty: i 3 has J = ln(2)/6
        # 4 levels (unsigned 2 bits or signed 3), [1,1,1,1,1]: i 4: P = [1,1,1,2]/5, Q uniform,
        # J = (3/20) ln 2; i 5: groups {0,1} {2} {3} {4}, Q = P, J = 0: the max wins.
        ([1, 1, 1, 1, 1], 2, False, 1.0, 5),
        ([1, 1, 1, 1, 1], 3, True, 1.0, 5),
        # 4 levels, [8,4,2,1,0,0,0,0,0,1]: i 4 keeps each bulk bin as its own group, P = [8,4,2,2]/16,
        # Q = [8,4,2,1]/15, J = (7/120) ln 2 = 0.040; i 5..9 fold the outlier into a group with no
        # unclipped mass (floored Q, J > 1.6); i 10 (the max) averages bins 0..2 to 14/3: J = 0.26.
        ([8, 4, 2, 1, 0, 0, 0, 0, 0, 1], 2, False, 1.0, 4),
    ],
)
def test_kl_threshold_on_hand_worked_histograms(counts, num_bits, signed, bin_width, expected_bins):
    obs = hand_built(counts, bin_width)
    threshold = calibration.kl_threshold(obs, num_bits, signed)
    assert threshold == expected_bins * bin_width
    assert ref_kl_threshold(obs.hist, num_bits, signed, bin_width, obs.max) == threshold


def test_kl_threshold_keeps_the_max_when_levels_cover_the_occupied_bins():
    # 2 levels, 2 occupied bins: nothing to round away, so the exact max (not a bin edge) comes back
    assert calibration.kl_threshold(hand_built([5, 1], max_value=1.25), 2, True) == 1.25
    assert calibration.kl_threshold(hand_built([0] * 15 + [3], max_value=15.5), 4, False) == 15.5
    assert calibration.kl_threshold(hand_built([], max_value=0.0), 8, True) == 0.0
    # one more occupied bin than levels: the search runs and returns a bin edge, not the max
    assert calibration.kl_threshold(hand_built(MAX_WINS, max_value=2.25), 2, True) == 3.0


@settings(max_examples=300, deadline=None)
@given(kl_inputs(), st.sampled_from([1.0, 2.0**-10]))
def test_kl_threshold_matches_reference_on_random_histograms(inputs, bin_width):
    counts, levels = inputs
    _kl_threshold_agrees(counts, levels, bin_width)


@settings(max_examples=15, deadline=None)
@given(kl_inputs(max_levels=256))
def test_kl_threshold_matches_reference_at_real_bit_widths(inputs):
    counts, levels = inputs
    _kl_threshold_agrees(counts, levels, 2.0**-8)


def _kl_threshold_agrees(counts, levels, bin_width):
    """calibration's cut must cost what the reference's best cut costs (up to rounding: two cuts
    may tie to the last bits, so the cost is compared, not the cut)."""
    obs = hand_built(counts, bin_width)
    for num_bits, signed in ((int(math.log2(levels)), False), (int(math.log2(levels)) + 1, True)):
        if num_bits < 2:
            continue
        threshold = calibration.kl_threshold(obs, num_bits, signed)
        costs = ref_kl_costs(counts, levels)
        if not costs:
            assert threshold == obs.max
            continue
        cut = threshold / bin_width
        assert cut == int(cut) and int(cut) in costs, f"cut {cut} outside {min(costs)}..{max(costs)}"
        best = min(costs.values())
        assert costs[int(cut)] <= best + 1e-9 * (1 + best), (cut, costs[int(cut)], best)


# ---- through QuantSite: a ReLU, and data with nothing small -------------------------------------


def observed(data, role, num_bits=8, chunks=3, rounding="half_even", name="encoder/block_1/ffn/hidden"):
    """A site that observed `data` (as float32, in `chunks` calls) and its Observations."""
    site = quant.QuantSite(name, role, num_bits, rounding=rounding)
    obs = calibration.observe([site])[name]
    assert site.observer is not None
    for chunk in np.array_split(np.asarray(data, np.float32), chunks):
        site(tf.constant(chunk))
    return site, obs


def test_kl_clips_a_heavy_tailed_relu_and_ignores_its_zeros():
    x = np.maximum(np.random.default_rng(11).standard_t(2, 20_000), 0.0).astype(np.float32)
    relu, obs = observed(x, "unsigned", num_bits=4)
    assert obs.zeros == np.count_nonzero(x == 0) > 9_000 and obs.max == x.max()
    expected = ref_kl_threshold(obs.hist, 4, False, obs.bin_width(), obs.max)
    assert calibration.kl_threshold(obs, 4, False) == expected
    calibration.calibrate_site(relu, obs, "kl")
    # the reference cut is 14.9375 (max 72.3): threshold 16, three octaves under the max's 128
    assert expected == 14.9375 and relu.threshold() == 16.0 and 64 < x.max() <= 128
    positive, positive_obs = observed(x[x > 0], "unsigned", num_bits=4)
    calibration.calibrate_site(positive, positive_obs, "kl")
    assert positive.log2_t.numpy() == relu.log2_t.numpy()  # half the data being 0 changes nothing


def test_kl_keeps_the_max_of_data_with_nothing_small():
    # |x| = 1 everywhere: every bin below the last is empty, and any cut under it clips all of x
    site, obs = observed(np.where(np.arange(1000) % 2 == 0, 1.0, -1.0), "activation", num_bits=8)
    calibration.calibrate_site(site, obs, "kl")
    assert site.threshold() == 1.0  # a cut that keeps no bin (J = 0/0) would give 1/16


# ---- percentile ---------------------------------------------------------------------------------


def percentile_edge(x, percentile):
    """Upper edge of the 2048-bin histogram bin holding np.percentile's inverted-CDF value (the
    smallest |x| with at least that fraction at or under it), capped at the max."""
    a = np.abs(np.asarray(x, np.float64))
    top = 2.0 ** np.ceil(np.log2(a.max()))
    width = top / BINS
    value = np.percentile(a, percentile, method="inverted_cdf")
    return min((np.floor(value / width) + 1) * width, a.max())


@pytest.mark.parametrize("percentile", [30.0, 50.0, 99.0, 99.99, 100.0])
@pytest.mark.parametrize("kind", ["normal", "relu"])
def test_percentile_is_the_bin_edge_of_np_percentile(kind, percentile):
    rng = np.random.default_rng(12)
    x = rng.normal(size=40_001).astype(np.float32)  # 40_001: no percentile lands on a whole rank
    role = "activation"
    if kind == "relu":
        x, role = np.maximum(x, 0), "unsigned"  # the zeros count: the 30th percentile is 0
    site, obs = observed(x, role)
    expected = percentile_edge(x, percentile)
    assert calibration.percentile_threshold(obs, percentile) == expected
    calibration.calibrate_site(site, obs, "percentile", percentile=percentile)
    assert site.log2_t.numpy() == pytest.approx(np.log2(expected), abs=1e-6)


def test_percentile_edges_by_hand():
    # 10 values of width-1 bins: 2 zeros, then 1, 2, 3 values in bins 0, 1, 2, one in bin 5, one in
    # bin 9 (max 9.5). Cumulative: 3, 5, 8, 8, 8, 9, 9, 9, 9, 10 (of 10).
    obs = hand_built([1, 2, 3, 0, 0, 1, 0, 0, 0, 1], max_value=9.5)
    obs.zeros = 2
    assert calibration.percentile_threshold(obs, 20.0) == 1.0  # 2 of 10 are zeros: 0, first edge
    assert calibration.percentile_threshold(obs, 50.0) == 2.0  # 5 values reached in bin 1
    assert calibration.percentile_threshold(obs, 80.0) == 3.0
    assert calibration.percentile_threshold(obs, 85.0) == 6.0  # bins 3, 4 are empty: bin 5
    assert calibration.percentile_threshold(obs, 90.0) == 6.0
    assert calibration.percentile_threshold(obs, 100.0) == 9.5  # bin 9's edge 10 is above the max


# ---- MSE ----------------------------------------------------------------------------------------


def numpy_fake_quant(x, log2_t, num_bits, signed, rounding):
    n, p = (-(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1) if signed else (0, 2**num_bits - 1)
    s = 2.0 ** (log2_t - (num_bits - 1 if signed else num_bits))
    v = x / s
    r = {"half_even": np.rint(v), "half_up": np.floor(v + 0.5), "floor": np.floor(v)}[rounding]
    return np.clip(r, n, p) * s


def brute_force_mse_log2_t(x, num_bits, signed, rounding):
    """The integer log2_t in [-24, 24] with the least squared error; ties keep the larger."""
    best, best_err = None, math.inf
    for k in range(24, -25, -1):
        err = float(np.mean((numpy_fake_quant(x, k, num_bits, signed, rounding) - x) ** 2))
        if err < best_err:
            best, best_err = k, err
    return best


@pytest.mark.parametrize(
    "kind, role, num_bits, rounding, clips",
    [
        ("student_t", "activation", 4, "half_even", True),
        ("student_t", "activation", 8, "floor", True),
        ("relu_t", "unsigned", 4, "half_up", True),
        ("relu_t", "unsigned", 3, "floor", True),
        ("normal", "activation", 6, "half_up", False),
    ],
)
def test_mse_is_the_brute_force_power_of_two(kind, role, num_bits, rounding, clips):
    rng = np.random.default_rng(13)
    x = {"student_t": rng.standard_t(3, 30_000), "relu_t": np.maximum(rng.standard_t(3, 30_000), 0),
         "normal": rng.normal(size=30_000)}[kind].astype(np.float32)  # under SAMPLE: all of x is kept
    site, obs = observed(x, role, num_bits, chunks=1, rounding=rounding, name="decoder/block_2/ffn/input")
    expected = brute_force_mse_log2_t(x.astype(np.float64), num_bits, site.signed, rounding)
    # heavy tails: clipping pays, so a search returning the max fails
    assert (expected < np.ceil(np.log2(np.abs(x).max()))) == clips
    calibration.calibrate_site(site, obs, "mse")
    assert site.log2_t.numpy() == expected
    assert calibration.mse_log2_t(obs, num_bits, site.signed, rounding) == expected


def test_mse_tie_keeps_the_larger_threshold():
    # unsigned 2 bits, x = [3] + [0.5] * 9. Threshold 4 (grid 0..3, step 1): 3 exact, each 0.5 rounds
    # half-even to 0, squared error 9 * 0.25 = 2.25. Threshold 2 (step 0.5, top 1.5): the 0.5s exact,
    # 3 clips to 1.5, 2.25 again. Threshold 1 clips 3 to 0.75: 5.06. The tie goes to 4.
    x = np.array([3.0] + [0.5] * 9, np.float32)
    site, obs = observed(x, "unsigned", 2, chunks=1)
    assert brute_force_mse_log2_t(x.astype(np.float64), 2, False, "half_even") == 2
    calibration.calibrate_site(site, obs, "mse")
    assert site.log2_t.numpy() == 2.0


def test_mse_quantizes_float64_observations_in_float64():
    """Observations keep float64 values; the MSE search must quantize them in float64. Unsigned
    2 bits, x = [3] + [1/2 + 2^-40] * 9. Threshold 4 (step 1): each 1/2 + 2^-40 rounds to 1, 3 is
    exact: 9 (1/2 - 2^-40)^2 = 9/4 - 9 * 2^-40 + ... Threshold 2 (step 1/2): 3 clips to 3/2, the
    rest cost 2^-80 each: 9/4 + 9 * 2^-80. Threshold 4 wins. Rounded to float32 first, 1/2 + 2^-40
    becomes the tie 1/2, which rounds (half to even) to 0 at threshold 4: 9/4 + 9 * 2^-40 + ...,
    and threshold 2 would win."""
    x = np.array([3.0] + [0.5 + 2.0**-40] * 9)
    obs = calibration.Observations(seed=0)
    obs.add(x)
    assert brute_force_mse_log2_t(x, 2, False, "half_even") == 2
    assert calibration.mse_log2_t(obs, 2, False, "half_even") == 2.0


# ---- Observations bookkeeping -------------------------------------------------------------------


def binned(a, top):
    return np.histogram(np.abs(a[a != 0]), bins=BINS, range=(0.0, top))[0]


def test_histogram_doubling_merges_bin_pairs():
    rng = np.random.default_rng(14)
    small = rng.uniform(-1, 1, 5_000)
    small[0] = 0.999  # top 1 after the first chunk
    obs = calibration.Observations(seed=0)
    obs.add(small)
    assert obs.top == 1.0
    np.testing.assert_array_equal(obs.hist, binned(small, 1.0))
    before = obs.hist.copy()
    large = rng.uniform(-3.5, 3.5, 5_000)  # two doublings: 1 -> 4
    obs.add(large)
    assert obs.top == 4.0 and obs.hist.size == BINS
    merged = np.concatenate([before.reshape(-1, 4).sum(axis=1), np.zeros(BINS - BINS // 4, np.int64)])
    np.testing.assert_array_equal(obs.hist, merged + binned(large, 4.0))
    np.testing.assert_array_equal(obs.hist, binned(np.concatenate([small, large]), 4.0))
    obs.add(np.array([4.0, -4.0]))  # at top exactly: no doubling, the last bin
    assert obs.top == 4.0 and obs.hist[-1] == binned(np.concatenate([small, large]), 4.0)[-1] + 2


def test_first_top_is_the_power_of_two_at_or_above_max():
    for values, top in (([0.3, -0.1], 0.5), ([1.0], 1.0), ([-5.0, 1.0], 8.0), ([1e-9], 2.0**-24)):
        obs = calibration.Observations(seed=0)
        obs.add(np.array(values))
        assert obs.top == top and obs.max == max(abs(v) for v in values)


def test_zeros_are_counted_apart_from_the_histogram():
    obs = calibration.Observations(seed=0)
    obs.add(np.array([0.0, -0.0, 0.0, 1.5, -1.5, 0.25]))
    assert obs.zeros == 3 and obs.hist.sum() == 3 and obs.count() == 6
    assert obs.top == 2.0 and obs.hist[1536] == 2 and obs.hist[256] == 1 and obs.hist[0] == 0
    obs.add(np.zeros(10))
    assert obs.zeros == 13 and obs.hist.sum() == 3 and obs.max == 1.5


def test_subsample_is_bounded_signed_and_without_replacement():
    obs = calibration.Observations(seed=0)
    few = np.arange(1.0, 1001.0)
    obs.add(few)
    np.testing.assert_array_equal(np.sort(obs.sample), few)  # under the bound: everything
    obs = calibration.Observations(seed=0)
    positive = np.arange(1.0, 50_001.0)
    obs.add(positive)
    obs.add(-positive)  # 100_000 values > SAMPLE
    sample = obs.sample
    assert sample.size == obs.keys.size == obs.SAMPLE
    assert np.unique(sample).size == sample.size  # distinct data: no value drawn twice
    assert np.all(np.isin(np.abs(sample), positive))
    # uniform over both chunks: about half negative (hypergeometric sd ~0.001)
    assert 0.49 < np.mean(sample < 0) < 0.51
    assert obs.count() == 100_000 and obs.zeros == 0


def test_subsample_at_exactly_the_bound_and_seeded_by_the_site():
    """SAMPLE values are all kept; the subsample's random keys come from the site's seed, so
    calibrating the same data twice (MSE reads the subsample) gives the same thresholds."""
    obs = calibration.Observations(seed=0)
    obs.add(np.arange(1.0, obs.SAMPLE + 1.0))
    assert obs.sample.size == obs.SAMPLE and obs.count() == obs.SAMPLE
    data = np.random.default_rng(12).normal(size=3 * calibration.Observations.SAMPLE)
    first, second = (observed(data, "activation")[1] for _ in range(2))
    np.testing.assert_array_equal(first.sample, second.sample)
    other = observed(data, "activation", name="encoder/block_2/ffn/hidden")[1]  # another name, seed
    assert other.sample.size == first.sample.size and not np.array_equal(np.sort(other.sample),
                                                                          np.sort(first.sample))


def test_log2_keeps_thresholds_inside_the_clamp():
    assert calibration.log2_threshold(0.0) == fixed_point.LOG2_T_MIN
    assert calibration.log2_threshold(2.0**30) == fixed_point.LOG2_T_MAX
    np.testing.assert_array_equal(calibration.log2_threshold([0.5, 3.0]), np.log2([0.5, 3.0]))


def test_kl_never_cuts_below_the_first_occupied_bin():
    """One occupied bin (200) past the 128 levels of a signed 8-bit grid: the only cut that keeps
    data is just above it; lower cuts would keep nothing (J = 0/0)."""
    assert calibration.kl_threshold(hand_built([0] * 200 + [5]), 8, True) == 201.0


def test_calibrate_dispatch_defaults_and_errors():
    """Defaults: method "max", percentile 99.99; KL uses the site's signedness (a signed 4-bit
    grid has 8 magnitude levels, not 16); probabilities get threshold 1 whatever the method."""
    data = np.random.default_rng(13).standard_t(3, 20_000)
    site, obs = observed(data, "activation")
    calibration.calibrate_site(site, obs)
    expected = calibration.log2_threshold(np.abs(data.astype(np.float32)).max())
    assert site.log2_t.numpy() == np.float32(expected)
    site, obs = observed(data, "activation")
    expected = calibration.log2_threshold(calibration.percentile_threshold(obs, 99.99))
    calibration.calibrate_site(site, obs, "percentile")
    assert site.log2_t.numpy() == np.float32(expected)
    site, obs = observed(data, "activation", num_bits=4)
    expected = calibration.log2_threshold(calibration.kl_threshold(obs, 4, True))
    assert expected != calibration.log2_threshold(calibration.kl_threshold(obs, 4, False))
    calibration.calibrate_site(site, obs, "kl")
    assert site.log2_t.numpy() == np.float32(expected)
    assert calibration.activation_log2_t(obs, "activation", 4, True, "half_even", "kl", 99.99) == expected
    for method in ("max", "percentile", "mse", "kl"):
        probability, obs = observed(np.random.default_rng(14).random(5000) * 0.1, "probability")
        calibration.calibrate_site(probability, obs, method)
        assert probability.log2_t.numpy() == 0.0 and probability.observer is None
        assert calibration.activation_log2_t(obs, "probability", 8, False, "half_even", method, 99.99) == 0.0
    message = r"calibration method must be one of max\|percentile\|mse\|kl, got 'mean'$"
    with pytest.raises(ValueError, match="^site 'encoder/block_1/ffn/hidden': " + message):
        calibration.calibrate_site(*observed(data, "activation"), "mean")
    with pytest.raises(ValueError, match="^" + message):
        calibration.activation_log2_t(obs, "activation", 8, True, "half_even", "mean", 99.99)
    with pytest.raises(ValueError, match="^" + message):
        calibration.calibrate(None, [], "mean")  # checked before the model is touched


def test_activation_log2_t_is_the_method_applied_to_the_observations():
    """activation_log2_t on its own: each method is the threshold function it names, for the
    site's bits, signedness and rounding."""
    x = np.random.default_rng(15).standard_t(2, 20_000)
    obs = calibration.Observations(seed=3)
    obs.add(x)
    max_abs = np.abs(x).max()
    assert calibration.activation_log2_t(obs, "activation", 8, True, "half_even", "max", 99.99) == (
        np.log2(max_abs))
    assert calibration.activation_log2_t(obs, "activation", 8, True, "half_even", "percentile", 99.0) == (
        calibration.log2_threshold(calibration.percentile_threshold(obs, 99.0)))
    for bits, signed, rounding in ((4, True, "half_even"), (3, False, "floor"), (6, True, "half_up")):
        assert calibration.activation_log2_t(obs, "activation", bits, signed, rounding, "mse", 99.99) == (
            brute_force_mse_log2_t(x, bits, signed, rounding))
        assert calibration.activation_log2_t(obs, "activation", bits, signed, rounding, "kl", 99.99) == (
            calibration.log2_threshold(calibration.kl_threshold(obs, bits, signed)))


def test_calibration_needs_at_least_one_value():
    empty, obs = observed(np.zeros(0), "activation", chunks=1)
    message = r"^site 'encoder/block_1/ffn/hidden': observed no data; cannot calibrate$"
    with pytest.raises(ValueError, match=message):
        calibration.calibrate_site(empty, obs, "max")
    with pytest.raises(ValueError, match=r"^observed no data; cannot calibrate$"):
        calibration.activation_log2_t(obs, "activation", 8, True, "half_even", "max", 99.99)
    one, obs = observed(np.array([3.0]), "activation", chunks=1)
    calibration.calibrate_site(one, obs, "max")
    assert one.log2_t.numpy() == np.float32(np.log2(3.0))


def test_mse_on_values_below_the_smallest_threshold():
    """|x| under 2^-24: the only candidate left is the clamp's floor, log2_t = -24."""
    site, obs = observed(np.full(100, 2.0**-26), "activation", chunks=1)
    calibration.calibrate_site(site, obs, "mse")
    assert site.log2_t.numpy() == fixed_point.LOG2_T_MIN


def weight_log2_t(w, method, shape):
    """max and 3sd read no grid: any will do."""
    return calibration.weight_log2_t(w, method, shape, 8, True, "half_even")


def test_weight_log2_t():
    """max|w| or |mean| + 3 std, per tensor, per output channel (the last axis) or per row (the
    first axis of a table), clamped."""
    rng = np.random.default_rng(16)
    w = rng.normal(size=(2, 8, 3)) * [0.1, 1.0, 10.0] + [0.0, 0.5, 0.0]
    np.testing.assert_array_equal(weight_log2_t(w, "max", ()), np.log2(np.abs(w).max()))
    np.testing.assert_array_equal(weight_log2_t(w, "max", (3,)),
                                  np.log2(np.abs(w).max(axis=(0, 1))))
    np.testing.assert_allclose(weight_log2_t(w, "3sd", (3,)),
                               np.log2(np.abs(w.mean(axis=(0, 1))) + 3 * w.std(axis=(0, 1))), rtol=1e-12)
    np.testing.assert_allclose(weight_log2_t(w, "3sd", ()), np.log2(abs(w.mean()) + 3 * w.std()),
                               rtol=1e-12)
    w32 = w.astype(np.float32)  # as a model's weights arrive: the statistics still run in float64
    w64 = w32.astype(np.float64)
    got = weight_log2_t(w32, "3sd", (3,))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, np.log2(np.abs(w64.mean(axis=(0, 1))) + 3 * w64.std(axis=(0, 1))))
    np.testing.assert_array_equal(weight_log2_t(np.array([[0.0, 2.0**30]]), "max", (2,)),
                                  [fixed_point.LOG2_T_MIN, fixed_point.LOG2_T_MAX])
    table = w[0]  # [8, 3]: a threshold per row has shape [8, 1]
    np.testing.assert_array_equal(weight_log2_t(table, "max", (8, 1)),
                                  np.log2(np.abs(table).max(axis=1, keepdims=True)))
    np.testing.assert_allclose(weight_log2_t(table, "3sd", (8, 1)),
                               np.log2(np.abs(table.mean(axis=1, keepdims=True))
                                       + 3 * table.std(axis=1, keepdims=True)), rtol=1e-12)
    with pytest.raises(ValueError, match=r"^weight init must be one of max\|3sd\|mse, got 'absmax'$"):
        weight_log2_t(w, "absmax", ())


@pytest.mark.parametrize("shape", [(), (3,), (3, 1)])
@pytest.mark.parametrize("bits", [3, 8])
def test_weight_mse_init_is_the_power_of_two_of_least_squared_error(shape, bits):
    """Each channel's (row's) threshold against every power of two near its max, by brute force:
    the least sum((Q(w) - w)^2) wins, the larger threshold on a tie."""
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, size=(48, 3)) * [0.1, 1.0, 10.0]  # heavy tails: clipping can pay
    w = w.T if shape == (3, 1) else w  # per row: a [3, 48] table
    got = calibration.weight_log2_t(w, "mse", shape, bits, True, "half_even")
    assert got.shape == shape and np.array_equal(got, np.ceil(got))
    columns = [w] if shape == () else list(w.T) if shape == (3,) else list(w)  # rows
    for i, part in enumerate(columns):
        top = int(np.ceil(np.log2(np.abs(part).max())))

        def error(k, part=part):
            s = 2.0 ** (k - (bits - 1))
            q = np.clip(np.round(part / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            return np.sum((q * s - part) ** 2)
        best = min(range(top, top - 9, -1), key=error)  # min keeps the first (largest) on a tie
        assert np.ravel(got)[i] == best
    if bits == 3:  # at 3 bits some channel gives up its maximum for a finer grid
        assert (np.ravel(got) < np.ravel(np.ceil(weight_log2_t(w, "max", shape)))).any()


def test_weight_mse_init_searches_eight_octaves_below_the_maximum():
    """One weight at 1 among 10^6 spread over +-2^-9: at 3 bits the least error clips the outlier
    to 2^-9's grid, but the search stops 8 octaves below max|w|'s power of two, as documented."""
    w = np.concatenate([[1.0], np.random.default_rng(3).uniform(-2.0**-9, 2.0**-9, 10**6)])
    assert calibration.least_error_log2_t(w, 0.0, 12, (), 3, True, "half_even") == -9
    assert calibration.weight_log2_t(w, "mse", (), 3, True, "half_even") == -8


# ---- calibrate(): a whole model ----------------------------------------------------------------


class TwoLayerModel:
    """What calibration.calibrate uses of a model.Transformer: `sites.sites`, `weight_sites()`
    and a call on (src, tgt_in, training). Its activation site sees src / 2."""

    def __init__(self, fail=False):
        self.sites = quant.TQTSites(quant.QuantConfig(wbits=4, abits=8, per_channel=True))
        self.w_site = self.sites.site("l/weight", "weight", channels=2)
        self.x_site = self.sites.site("l/input", "activation")
        self.p_site = self.sites.site("a/softmax_output", "probability")
        self.weight = tf.constant([[0.5, -3.0], [1.0, 0.25]])
        self.fail = fail
        self.calls = []

    def weight_sites(self):
        return [(self.w_site, self.weight)]

    def __call__(self, src, tgt_in, training):
        self.calls.append((src.tolist(), tgt_in.tolist(), training))
        if self.fail:
            raise RuntimeError("model failed")
        x = self.x_site(tf.constant(src, tf.float32) / 2)
        return self.p_site(tf.nn.softmax(x))


def test_calibrate_initializes_every_site_and_stops_observing():
    batches = [(np.array([[3, 5, 0]]), np.array([[2, 7, 9, 3]])), (np.array([[11, 4]]), np.array([[2, 3]]))]
    model = TwoLayerModel()
    calibration.calibrate(model, batches, "max", "max")
    assert model.calls == [([[3, 5, 0]], [[2, 7, 9]], False), ([[11, 4]], [[2]], False)]
    assert model.x_site.log2_t.numpy() == np.float32(np.log2(5.5))  # max |src / 2| over both batches
    assert model.p_site.log2_t.numpy() == 0.0
    # max|w| = 1 and 3 per channel; 1 would sit above its threshold-1 grid's top: threshold 2
    np.testing.assert_array_equal(model.w_site.log2_t.numpy(), np.log2([2.0, 3.0]).astype(np.float32))
    assert all(site.observer is None for site in model.sites.sites.values())
    calibration.calibrate(model, batches, "max", "3sd")
    w = model.weight.numpy().astype(np.float64)
    np.testing.assert_allclose(model.w_site.log2_t.numpy(), np.log2(np.abs(w.mean(0)) + 3 * w.std(0)),
                               rtol=1e-6)

    failing = TwoLayerModel(fail=True)
    with pytest.raises(RuntimeError, match="model failed"):
        calibration.calibrate(failing, batches)
    assert all(site.observer is None for site in failing.sites.sites.values())  # not left observing


def test_observe_gives_each_site_its_own_observations():
    sites = [quant.QuantSite(name, "activation") for name in ("a/input", "b/input")]
    observed_by_name = calibration.observe(sites)
    assert list(observed_by_name) == ["a/input", "b/input"]
    sites[0](tf.constant([1.0, -2.0]))
    sites[1](tf.constant([4.0]))
    assert [obs.count() for obs in observed_by_name.values()] == [2, 1]
    assert [obs.max for obs in observed_by_name.values()] == [2.0, 4.0]
    with pytest.raises(RuntimeError, match="observing works eagerly only"):
        tf.function(sites[0])(tf.constant([1.0]))


@pytest.mark.parametrize("bits,signed", [(8, True), (16, True), (4, True)])
def test_max_init_keeps_the_maximum_on_the_grid(bits, signed):
    """A maximum in the last step below a power-of-two threshold (gamma = 1 under threshold 1,
    grid top 1 - 2^-(b-1)) would be clipped and get no gradient: its threshold is doubled;
    any other maximum keeps log2(max)."""
    site = quant.QuantSite("ln/gamma", "weight", bits)
    _, p = fixed_point.integer_range(bits, signed)
    for top, threshold in ((1.0, 2.0), (0.5, 1.0), (1.0 - 2.0 ** -(bits - 1), 1.0), (0.74, 1.0),
                           (1.0 - 2.0 ** -bits, 2.0)):
        calibration.init_weight_site(site, np.array([0.1, -top / 2, top]))
        assert float(site.threshold()) == threshold, (top, bits)
        assert np.abs(site.grid().quantize(np.array([top]), "half_even")).max() <= p
    w = np.array([[1.0, 0.3], [0.2, -0.3]])  # per channel: only the first column's max sits at 1
    site = quant.QuantSite("w", "weight", bits, channels=2)
    calibration.init_weight_site(site, w)
    np.testing.assert_array_equal(site.threshold(), [2.0, 0.5])
