"""What the no-float tracers share: arrays of an ndarray subclass whose every descendant is checked
(tests/test_int_layer_norm.py over the LayerNorm kernel, tests/test_intonly_no_float.py over the
whole integer-only engine)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def plain(x, cls: type):
    """x with each `cls` array in it (also inside tuples, lists and dicts) viewed as an ndarray."""
    if isinstance(x, cls):
        return x.view(np.ndarray)
    if isinstance(x, tuple | list):
        return type(x)(plain(v, cls) for v in x)
    if isinstance(x, dict):
        return {k: plain(v, cls) for k, v in x.items()}
    return x


def traced(x, cls: type, float_scalar: Callable[[object], None]):
    """x (or each item of a tuple) viewed as `cls`, whose __array_finalize__ checks it; a float
    scalar result is reported to `float_scalar`."""
    if isinstance(x, tuple):
        return tuple(traced(v, cls, float_scalar) for v in x)
    if isinstance(x, np.ndarray):
        return x.view(cls)
    if isinstance(x, float | complex | np.inexact):
        float_scalar(x)
    return x
