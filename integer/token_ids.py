"""Token ids and the attention mask value: what the TF model, the data pipeline and the
integer engines agree on. Sources are pieces + EOS, targets BOS + pieces + EOS."""

from __future__ import annotations

import numpy as np

PAD, UNK, BOS, EOS = 0, 1, 2, 3  # sources: pieces + EOS; targets: BOS + pieces + EOS
NEG_INF = -1e9  # additive attention mask; exp(NEG_INF - max) is exactly 0 in float32


def strip_ids(ids) -> list[int]:
    """The piece ids of a decoder output: up to the first EOS, without PAD/BOS."""
    pieces = []
    for token in map(int, ids):
        if token == EOS:
            break
        if token not in (PAD, BOS):
            pieces.append(token)
    return pieces


def pad_batch(sequences: list[list[int]]) -> np.ndarray:
    """int32 [len(sequences), longest], padded with PAD."""
    out = np.full((len(sequences), max(map(len, sequences))), PAD, np.int32)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out
