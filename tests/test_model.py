"""Model: masks, positions, decoding (greedy and beam 1 against an argmax loop, beam search against
exhaustive search and a reference beam search, long inputs)."""

import functools
import itertools
import types

import numpy as np
import pytest
import tensorflow as tf

from integer.token_ids import BOS, EOS, NEG_INF, PAD
from integer.token_ids import strip_ids as strip_output
from model import Transformer
from modules import Adam, Dense, causal_bias, noam_lr, padding_bias, positional_encoding


def tiny_hp(**kw):
    hp = dict(d_model=32, d_ff=64, num_blocks=2, num_heads=4, dropout_rate=0.0, smoothing=0.1,
              decode_margin=6, seed=1)
    hp.update(kw)
    return types.SimpleNamespace(**hp)


@pytest.fixture(scope="module")
def model():
    tf.random.set_seed(3)
    m = Transformer(tiny_hp(), 40)
    # a larger embedding makes a random model's outputs varied (not one repeated token)
    m.embedding.assign(tf.random.normal(m.embedding.shape, stddev=1.0, seed=4))
    return m


def random_src(batch=5, length=9, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(4, vocab, size=(batch, length)).astype(np.int32)
    for i in range(batch):  # ragged lengths: EOS then padding
        n = rng.integers(2, length)
        src[i, n] = EOS
        src[i, n + 1:] = PAD
    return tf.constant(src)


def test_padding_bias_masks_pad_keys_only():
    bias = padding_bias(tf.constant([[5, 3, 0, 0]])).numpy()
    assert bias.shape == (1, 1, 1, 4)
    np.testing.assert_array_equal(bias[0, 0, 0], [0, 0, NEG_INF, NEG_INF])


def test_causal_bias_is_lower_triangular():
    bias = causal_bias(4).numpy()[0, 0]
    assert np.all(bias[np.tril_indices(4)] == 0)
    assert np.all(bias[np.triu_indices(4, 1)] == NEG_INF)


def test_positional_encoding_formula_any_length():
    pe = positional_encoding(300, 16).numpy()
    pos, i = 250, 3
    assert pe.shape == (300, 16)
    np.testing.assert_allclose(pe[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)), atol=1e-4)
    np.testing.assert_allclose(pe[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)), atol=1e-4)


def test_future_tokens_do_not_change_past_logits(model):
    src = random_src(2)
    tgt = tf.constant([[2, 7, 8, 9, 10], [2, 11, 12, 13, 14]])
    changed = tf.concat([tgt[:, :3], tf.constant([[20, 21], [22, 23]])], axis=1)
    a, b = model(src, tgt).numpy(), model(src, changed).numpy()
    np.testing.assert_allclose(a[:, :3], b[:, :3], rtol=1e-5, atol=1e-5)


def test_cached_and_uncached_greedy_give_the_same_tokens(model):
    src = random_src(6, seed=1)
    cached, uncached = model.greedy(src).numpy(), model.greedy_uncached(src).numpy()
    assert len({tuple(strip_output(r.tolist())) for r in cached}) > 1, "degenerate test model"
    np.testing.assert_array_equal(cached, uncached)


@functools.cache
def teacher_forced(model: Transformer):
    """model(src, tgt_in) as one traced graph: the references below call it many times."""
    spec = tf.TensorSpec([None, None], tf.int32)
    return tf.function(lambda src, tgt_in: model(src, tgt_in), input_signature=[spec, spec])


def argmax_loop(model, src) -> list[list[int]]:
    """Greedy decoding spelled out, one sentence at a time: the teacher-forced logits of
    BOS + the outputs so far, argmax at the last position, stop after EOS or at the limit
    (non-pad source tokens + decode_margin).  Shares no decoding code with the model."""
    outputs = []
    for row in np.asarray(src):
        limit = int(np.count_nonzero(row != PAD)) + model.margin
        tokens = [BOS]
        while len(tokens) <= limit and tokens[-1] != EOS:
            logits = teacher_forced(model)(row[None], np.array([tokens], np.int32))[0, -1].numpy()
            tokens.append(int(np.argmax(logits)))
        outputs.append(tokens[1:])
    return outputs


def padded(outputs: list[list[int]], width: int) -> np.ndarray:
    rows = np.full((len(outputs), width), PAD, np.int32)
    for row, out in zip(rows, outputs):
        row[: len(out)] = out
    return rows


def expected_greedy(model, src) -> np.ndarray:
    outputs = argmax_loop(model, src)
    # the cached decoder attends to a PAD token inside an output, the teacher-forced one masks it
    assert all(PAD not in out for out in outputs), "reference emitted PAD: outputs not comparable"
    width = int(np.max(np.count_nonzero(np.asarray(src) != PAD, axis=1))) + model.margin
    return padded(outputs, width)


def test_greedy_and_beam_one_are_the_argmax_loop(model):
    src = random_src(6, seed=2)
    # the 7-token model of the beam tests below (another seed), on longer sources: its greedy
    # outputs use the last id of its vocabulary, so an argmax that misses an end of it shows
    small = tiny_model(3)
    small_src = np.zeros((8, 6), np.int32)
    rng = np.random.default_rng(1)
    for row, n in zip(small_src, [1, 2, 3, 4, 5, 6, 3, 5]):
        row[:n] = rng.integers(4, TINY_VOCAB, n)
    for m, s in [(model, src), (small, small_src)]:
        expected = expected_greedy(m, s)
        assert len({tuple(r) for r in expected}) > 1, "degenerate test model"
        np.testing.assert_array_equal(m.greedy(s).numpy(), expected)
        np.testing.assert_array_equal(m.greedy_uncached(s).numpy(), expected)
        np.testing.assert_array_equal(m.beam_search(s, 1, 0.6).numpy(), expected)
    assert TINY_VOCAB - 1 in expected


def test_beam_search_returns_one_wellformed_hypothesis_per_sentence(model):
    src = random_src(4, seed=3)
    out = model.beam_search(src, 4, 0.6).numpy()
    assert out.shape[0] == 4
    for row in out:  # after the first EOS only padding follows
        row = row.tolist()
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_beam_search_on_a_single_sentence(model):
    src = random_src(1, seed=6)
    np.testing.assert_array_equal(model.beam_search(src, 1).numpy(), expected_greedy(model, src))
    assert model.beam_search(src, 4).shape[0] == 1


# ---------------------------------------------------------------- beam search, checked exhaustively
TINY_VOCAB = 7  # PAD, UNK, BOS, EOS and the words 4, 5, 6
# NumPy seed and embedding scale of the tiny model: logits spread enough that EOS competes with
# words (so outputs of 1, 2 and 3 tokens win) and that the length penalty changes some winners
SEED_TINY, TABLE_STD = 0, 0.5


def tiny_model(seed: int) -> Transformer:
    """A 7-token model with decode_margin 1: a source of 1-2 non-pad tokens allows 2-3 output
    tokens, few enough to enumerate every output.  All weights come from NumPy, so the score
    landscape is fixed; the dense weights at 3x the Glorot scale make the outputs depend on the
    source and the prefix (at the initial scale a random model mostly repeats its input token).

    PAD is made improbable: the last LayerNorm's normalized output has zero mean over features,
    so with beta = 1 the logit of token j gains sum(E_j): 0 for the centred rows of the other
    tokens, -2 d for the PAD row (-2 everywhere).  An output with PAD inside is scored
    differently by the cached decoder (which attends to it) and the teacher-forced one (which
    masks PAD keys), so it must never come near winning."""
    hp = tiny_hp(d_model=16, d_ff=32, num_blocks=1, num_heads=2, decode_margin=1)
    m = Transformer(hp, TINY_VOCAB)
    rng = np.random.default_rng(seed)
    for dense in (d for d in m.submodules if isinstance(d, Dense)):
        d_in, d_out = dense.w.shape
        dense.w.assign(rng.uniform(-3, 3, (d_in, d_out)) * np.sqrt(6 / (d_in + d_out)))
        dense.b.assign(rng.normal(0, 0.1, d_out))
    table = rng.normal(0, TABLE_STD, (TINY_VOCAB, hp.d_model))
    table -= table.mean(axis=1, keepdims=True)
    table[PAD] = -2.0
    m.embedding.assign(table)
    m.decoder[-1].ln3.beta.assign(tf.ones([hp.d_model]))
    return m


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(SEED_TINY)


def every_output(limit: int) -> list[tuple[int, ...]]:
    """Every output a decoder can end with under `limit`: EOS after 0..limit-2 other tokens, or
    `limit` tokens of which only the last may be EOS (cut at the limit)."""
    not_eos = [v for v in range(TINY_VOCAB) if v != EOS]  # PAD, UNK and BOS included
    outputs = [(*body, EOS) for n in range(limit - 1) for body in itertools.product(not_eos, repeat=n)]
    return outputs + [(*body, v) for body in itertools.product(not_eos, repeat=limit - 1)
                      for v in range(TINY_VOCAB)]


def teacher_forced_logp(model, src_row: np.ndarray, prefixes: list[tuple[int, ...]]) -> np.ndarray:
    """log softmax (float64) of the teacher-forced logits after BOS + each prefix: [N, L, V]."""
    width = max(len(p) for p in prefixes) + 1
    tgt_in = padded([[BOS, *p] for p in prefixes], width)
    logits = teacher_forced(model)(np.repeat(src_row[None], len(prefixes), axis=0), tgt_in)
    return tf.nn.log_softmax(tf.cast(logits, tf.float64)).numpy()


def output_scores(model, src_row: np.ndarray, outputs: list[tuple[int, ...]]) -> np.ndarray:
    """Sum over each output's tokens (EOS included) of their log-probabilities."""
    logp = teacher_forced_logp(model, src_row, [out[:-1] for out in outputs])
    assert logp[..., PAD].max() < -15, "PAD is not improbable: see tiny_model"
    return np.array([sum(logp[i, t, tok] for t, tok in enumerate(out)) for i, out in enumerate(outputs)])


def gnmt(scores: np.ndarray, lengths: np.ndarray, alpha: float) -> np.ndarray:
    """score / lp(len), lp = ((5 + len) / 6)^alpha; len counts the output tokens, EOS included."""
    return scores / ((5.0 + lengths) / 6.0) ** alpha


BRUTE_SOURCES = np.array([[5, 3], [4, 3], [6, 3], [6, 5], [4, 6], [3, 0], [5, 0]], np.int32)


def test_beam_search_finds_the_brute_force_best_output(tiny):
    """With a beam wider than the number of possible outputs nothing is pruned, so beam search
    must return the best of all outputs by score / lp(len), scored here by teacher forcing."""
    src = BRUTE_SOURCES
    limits = np.count_nonzero(src != PAD, axis=1) + tiny.margin
    assert set(limits) == {2, 3}
    tables = []
    for row, limit in zip(src, limits):
        outputs = every_output(int(limit))
        tables.append((outputs, output_scores(tiny, row, outputs), np.array([len(o) for o in outputs])))
    beam = max(len(outputs) for outputs, _, _ in tables) + 5  # 259 outputs of 3 tokens

    def best(table, alpha):
        outputs, scores, lengths = table
        return outputs[int(np.argmax(gnmt(scores, lengths, alpha)))]

    # The smallest alpha at which some sentence's winner changes (bisection): just below and just
    # above it, a penalty that is off by a little, e.g. (6 + len) / 6, picks the other winner.
    def flips(alpha):
        return any(best(t, alpha) != best(t, 0.0) for t in tables)

    large = 8.0
    assert flips(large), "the length penalty never changes a winner: a wrong one would go unseen"
    low, high = 0.0, large
    for _ in range(50):
        low, high = (low, (low + high) / 2) if flips((low + high) / 2) else ((low + high) / 2, high)
    alphas = [0.0, 0.6, 0.95 * high, 1.05 * high, large]

    expected = {}
    for alpha in alphas:
        winners = []
        for table in tables:
            normalized = np.sort(gnmt(table[1], table[2], alpha))
            # well separated, so float32 differences between cached and teacher-forced logits
            # cannot swap the first two
            assert normalized[-1] - normalized[-2] > 1e-4, (alpha, normalized[-2:])
            winners.append(best(table, alpha))
        expected[alpha] = padded([list(w) for w in winners], int(limits.max()))
    lengths = {len(w) for e in expected.values() for w in (r[r != PAD] for r in e)}
    assert lengths == {1, 2, 3}, lengths  # EOS first, EOS second, and cut at the limit all win
    assert not np.array_equal(expected[0.0], expected[large])
    for alpha in alphas:
        np.testing.assert_array_equal(tiny.beam_search(tf.constant(src), beam, alpha).numpy(),
                                      expected[alpha], err_msg=f"alpha={alpha}")


def reference_beam_search(model, src_row: np.ndarray, beam: int, alpha: float) -> list[int]:
    """Textbook beam search over teacher-forced log-probabilities: keep the `beam` best
    hypotheses by summed log-probability; a finished one (ended by EOS, or at the limit) stays as
    it is and competes with its score; at the end the best by score / lp(len)."""
    limit = int(np.count_nonzero(src_row != PAD)) + model.margin

    def done(h):
        return len(h) == limit or (len(h) > 0 and h[-1] == EOS)

    hyps = [((), 0.0)]
    while not all(done(h) for h, _ in hyps):
        live = [(h, s) for h, s in hyps if not done(h)]
        logp = teacher_forced_logp(model, src_row, [h for h, _ in live])[:, -1]
        candidates = [(h, s) for h, s in hyps if done(h)]
        candidates += [((*h, v), s + lp[v]) for (h, s), lp in zip(live, logp) for v in range(TINY_VOCAB)]
        hyps = sorted(candidates, key=lambda c: -c[1])[:beam]
    scores = np.array([s for _, s in hyps])
    return list(hyps[int(np.argmax(gnmt(scores, np.array([len(h) for h, _ in hyps]), alpha)))][0])


def test_narrow_beam_search_matches_a_reference_beam_search(tiny):
    """Beams narrower than the number of hypotheses prune: which ones survive depends on ranking
    by the summed score, which the exhaustive test cannot see."""
    rng = np.random.default_rng(0)
    src = np.zeros((8, 5), np.int32)
    for row, n in zip(src, [1, 2, 3, 4, 4, 3, 2, 4]):
        row[:n] = rng.integers(4, TINY_VOCAB, n)
    width = int(np.count_nonzero(src != PAD, axis=1).max()) + tiny.margin
    greedy = padded([reference_beam_search(tiny, row, 1, 0.0) for row in src], width)
    for beam in (2, 3):
        expected = padded([reference_beam_search(tiny, row, beam, 0.6) for row in src], width)
        assert not np.array_equal(expected, greedy)  # the beam changes some outputs
        np.testing.assert_array_equal(tiny.beam_search(tf.constant(src), beam, 0.6).numpy(), expected,
                                      err_msg=f"beam={beam}")


def test_output_length_is_source_length_plus_margin(model):
    src = random_src(3, seed=4)
    out = model.greedy(src).numpy()
    src_len = (src.numpy() != PAD).sum(1)
    for row, n in zip(out, src_len):
        assert len(strip_output(row.tolist())) <= n + model.margin


def test_sentence_three_times_maxlen_decodes(model):
    long_src = random_src(1, length=3 * 100, seed=5)
    out = model.greedy(long_src).numpy()
    assert out.shape[0] == 1 and out.shape[1] >= 1


def test_d_model_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        Transformer(tiny_hp(d_model=30, num_heads=4), 10)


def test_noam_schedule_peaks_at_warmup():
    lrs = [float(noam_lr(s, 1e-3, 100)) for s in (1, 50, 100, 200, 400)]
    assert lrs[0] < lrs[1] < lrs[2] and lrs[2] > lrs[3] > lrs[4]
    assert lrs[2] == pytest.approx(1e-3)


def test_adam_matches_textbook_update():
    var = tf.Variable([1.0, -2.0])
    opt = Adam([var], name="adam", beta1=0.9, beta2=0.99, eps=1e-8)
    g = tf.constant([0.5, -1.0])
    for _ in range(2):
        opt.apply([g], tf.constant(0.1))
    # two identical gradients: m_hat = g, v_hat = g^2, so each step moves by ~lr * sign(g)
    np.testing.assert_allclose(var.numpy(), [1.0 - 0.2, -2.0 + 0.2], rtol=1e-5)
