"""Model: masks, positions, decoding (cache vs no cache, beam 1 vs greedy, long inputs)."""

import types

import numpy as np
import pytest
import tensorflow as tf

from data_load import EOS_ID as EOS
from data_load import PAD_ID as PAD
from data_load import strip_ids as strip_output
from model import Transformer
from modules import NEG_INF, Adam, causal_bias, noam_lr, padding_bias, positional_encoding


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


def test_beam_one_equals_greedy(model):
    src = random_src(6, seed=2)
    np.testing.assert_array_equal(model.beam_search(src, 1, 0.6).numpy(), model.greedy(src).numpy())


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
    np.testing.assert_array_equal(model.beam_search(src, 1).numpy(), model.greedy(src).numpy())
    assert model.beam_search(src, 4).shape[0] == 1


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
