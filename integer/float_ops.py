"""The float steps of the matmul-only engine (everything between its integer matmuls), in float32
as the TF graph computes them: positions, softmax, log-softmax, LayerNorm and the masks."""

from __future__ import annotations

import numpy as np

from integer.token_ids import NEG_INF, PAD

# As in modules.in_float64, LayerNorm, softmax and the positions are computed in float64 and
# rounded once to float32: NumPy and TF reduce in different orders, and in float32 a one-ULP
# difference could cross a rounding boundary of the next quantizer; rounded from float64 both
# engines get the same float32.


def positional_encoding(length: int, d_model: int, start: int = 0) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...) for pos in
    [start, start + length), float64 -> float32."""
    pos = np.arange(start, start + length, dtype=np.float64)[:, None]
    i = np.arange(d_model // 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, 2.0 * i / d_model)
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(length, d_model).astype(np.float32)


def softmax(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """softmax(x) = exp(x - max) / sum(exp(x - max)) over the last axis, in float64, rounded once
    to `dtype` (float32: the engine; float64: a reference for the integer kernels' errors)."""
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(dtype)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log_softmax(x) = (x - max) - log(sum(exp(x - max))), in float64 (beam scores stay float64)."""
    shifted = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float,
               dtype: type = np.float32) -> np.ndarray:
    """gamma * (x - mean) * rsqrt(var + eps) + beta over the last axis, var = mean((x - mean)^2),
    in float64, rounded once to `dtype`."""
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(axis=-1, keepdims=True)
    var = np.square(centered).mean(axis=-1, keepdims=True)
    y = gamma.astype(np.float64) * centered / np.sqrt(var + eps) + beta.astype(np.float64)
    return y.astype(dtype)


def padding_bias(ids: np.ndarray) -> np.ndarray:
    """[B, 1, 1, L]: -1e9 at padding keys, 0 elsewhere."""
    return (ids == PAD).astype(np.float32)[:, None, None, :] * np.float32(NEG_INF)


def causal_bias(length: int) -> np.ndarray:
    """[1, 1, L, L]: query i sees keys j <= i."""
    future = 1.0 - np.tril(np.ones((length, length), np.float32))
    return future[None, None] * np.float32(NEG_INF)
