"""The integer contract: everything the TF model, the exporter and the integer engine must agree on.

NumPy and the standard library only (never TensorFlow), so an FPGA engineer can read the spec
here and the integer engine can run without TF. The equations are derived in `docs/tqt.md`.

    grid        x ~ q * 2^-f,  q in [n, p] = [-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1]
    frac bits   f = (b - 1 or b) - ceil(log2_t)           (docs/tqt.md, "The grid")
    quantizer   q = clip(R(x * 2^f), n, p)                R: one of ROUNDINGS
    bias grid   q_b = clip(round_half_even(b * 2^(f_x + f_w)), int32)
    presets     PRESETS: --quant name -> (weight bits, activation bits)
    site names  one builder per family (dense, attention, block, embedding, output)
    export      FORMAT_VERSION, model.npz keys, manifest, $readmemh mem files, SHA-256
    token ids   PAD, UNK, BOS, EOS; the additive attention mask NEG_INF
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# --------------------------------------------------------------------------------------------
# Token ids and masks
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Bits, roundings, presets
# --------------------------------------------------------------------------------------------

ROUNDINGS = ("half_even", "half_up", "floor")  # TQT's kernels, Xilinx DPUs, truncation
MIN_BITS, MAX_BITS = 2, 16
# --quant presets: (weight bits, activation bits); "none" is the float model
PRESETS: dict[str, tuple[int, int] | None] = {
    "none": None,
    "w8a8": (8, 8),
    "w6a6": (6, 6),
    "w4a8": (4, 8),
    "w4a4": (4, 4),
    "w3a8": (3, 8),
    "w2a8": (2, 8),
}
# Roles of a site and whether its integers are signed: ReLU outputs and softmax
# probabilities are non-negative, so they spend no bit on the sign.
SIGNED_BY_ROLE = {"weight": True, "activation": True, "unsigned": False, "probability": False,
                  "residual": True}  # residual: the residual stream and LayerNorm (--residual_bits)
# With |log2_t| <= 24 and b <= 16, s and 1/s stay far inside float32's normal range
# (2^-40 .. 2^40), so x * 2^f neither overflows nor loses bits to denormals.
LOG2_T_MIN, LOG2_T_MAX = -24.0, 24.0
BIAS_BITS = 32  # biases are int32 on the accumulator grid


def check_bits_and_rounding(num_bits: int, rounding: str) -> None:
    """Raise ValueError unless MIN_BITS <= num_bits <= MAX_BITS and rounding is in ROUNDINGS."""
    if not isinstance(num_bits, int) or not MIN_BITS <= num_bits <= MAX_BITS:
        raise ValueError(f"num_bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {num_bits!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def magnitude_bits(num_bits: int, signed: bool) -> int:
    """Bits left for the magnitude: b - 1 (signed, one is the sign) or b (unsigned)."""
    return num_bits - 1 if signed else num_bits


def integer_range(num_bits: int, signed: bool) -> tuple[int, int]:
    """[n, p] = [-2^(b-1), 2^(b-1) - 1] (signed) or [0, 2^b - 1] (unsigned)."""
    top = 2 ** magnitude_bits(num_bits, signed)
    return (-top, top - 1) if signed else (0, top - 1)


def threshold_axes(rank: int, shape: tuple[int, ...]) -> list[int]:
    """The axes of a rank-`rank` tensor along which a threshold of `shape` broadcasts (what
    dL/dlog2_t and a weight's calibration statistics sum over): all for [] (per tensor), all but
    the last for [C] (per channel), the last for [C, 1] (per row of a table)."""
    lead = rank - len(shape)
    return list(range(lead)) + [lead + i for i, d in enumerate(shape) if d == 1]


def frac_bits(log2_t, num_bits: int, signed: bool) -> np.ndarray:
    """Fractional bits f of the grid, s = 2^-f:  f = (b - 1 or b) - ceil(log2_t).  int64."""
    return magnitude_bits(num_bits, signed) - np.ceil(log2_t).astype(np.int64)


def round_to_integer(v: np.ndarray, rounding: str) -> np.ndarray:
    """R(v) in v's float type, in place: rint (half to even), floor(v + 0.5) (half up, the sum
    rounded in v's type as the TF graph does), or floor."""
    if rounding == "half_even":
        return np.rint(v, out=v)
    if rounding == "half_up":
        return np.floor(v + v.dtype.type(0.5), out=v)
    if rounding == "floor":
        return np.floor(v, out=v)
    raise ValueError(f"unknown rounding {rounding!r}")


def int_dtype(bits: int, signed: bool = True) -> np.dtype:
    """The smallest NumPy integer type holding `bits`-bit values (int8, int16, int32; uint8 ...)."""
    for width in (8, 16, 32, 64):
        if bits <= width:
            return np.dtype(f"{'' if signed else 'u'}int{width}")
    raise ValueError(f"no integer type holds {bits} bits")


@dataclass(frozen=True)
class Grid:
    """A site's integer grid: x ~ q * 2^-f with q in integer_range(bits, signed). `f` is an int64
    array that broadcasts against the site's tensor: [], [channels] (a weight's last axis) or
    [rows, 1] (a table used as x @ E^T: the embedding with --per_row_embedding)."""

    bits: int
    signed: bool
    f: np.ndarray

    @property
    def range(self) -> tuple[int, int]:
        return integer_range(self.bits, self.signed)

    @property
    def output_f(self) -> np.ndarray:
        """f along the output axis of the matmul this weight feeds: [] or [channels]; a table's
        per-row [rows, 1] becomes [rows], the output channels of x @ E^T."""
        return self.f.reshape(-1) if self.f.ndim == 2 else self.f

    @property
    def max_abs(self) -> int:
        """max |q|: 2^(b-1) signed, 2^b - 1 unsigned."""
        return max(-self.range[0], self.range[1])

    def quantize(self, x: np.ndarray, rounding: str, dtype: type = np.float32) -> np.ndarray:
        """q = clip(R(x * 2^f), n, p) computed in `dtype` (float32: as the TF graph does it;
        x * 2^f is exact). Returned as `dtype` holding the integers (exact: |q| <= 2^16)."""
        v = np.asarray(x, dtype) * np.exp2(self.f).astype(dtype)  # a new array
        n, p = self.range
        return np.clip(round_to_integer(v, rounding), n, p, out=v)

    def fake_quantize(self, x: np.ndarray, rounding: str) -> np.ndarray:
        """q * 2^-f in float64: the values the grid represents x by."""
        return self.quantize(x, rounding, np.float64) * np.exp2(-self.f.astype(np.float64))


# --------------------------------------------------------------------------------------------
# Site names: one builder per family, used by the TF model, the exporter and the engine
# --------------------------------------------------------------------------------------------

EMBEDDING = "embedding/weight"  # the shared table: embedding lookup and output projection
OUTPUT_INPUT = "decoder/output_input"  # the decoder output before the projection
EMBEDDING_SUM = "embedding_sum"  # integer-only: E[ids] sqrt(d) + PE, both sides (residual grid)
OUTPUT_PROJECTION = "decoder/output_projection"  # the matmul Q(y) Q(E)^T


def block(side: str, index: int) -> str:
    """`encoder/block_1` for side "encoder", index 0 (blocks count from 1 in names)."""
    return f"{side}/block_{index + 1}"


class DenseNames(NamedTuple):
    """A dense layer `<prefix>`: its input and weight sites, its bias key in model.npz."""

    input: str
    weight: str
    bias: str


def dense(prefix: str) -> DenseNames:
    return DenseNames(f"{prefix}/input", f"{prefix}/weight", f"{prefix}/bias")


class AttentionNames(NamedTuple):
    """Attention `<prefix>`: dense layers W^Q, W^K, W^V, W^O; the sites Q and K before Q K^T,
    P (softmax output) and V before P V; the two matmuls."""

    wq: str
    wk: str
    wv: str
    wo: str
    query: str
    key: str
    probs: str
    value: str
    scores: str
    context: str


# site leaf -> the attention matmul it feeds
_ATTENTION_MATMUL = {"query_input": "scores", "key_input": "scores",
                     "softmax_output": "context", "value_input": "context"}


def attention(prefix: str) -> AttentionNames:
    layers = [f"{prefix}/{leaf}" for leaf in ("wq", "wk", "wv", "wo")]
    sites = [f"{prefix}/{leaf}" for leaf in _ATTENTION_MATMUL]
    return AttentionNames(*layers, *sites, f"{prefix}/scores", f"{prefix}/context")


class FeedForwardNames(NamedTuple):
    dense1: str
    dense2: str


def feed_forward(prefix: str) -> FeedForwardNames:
    return FeedForwardNames(f"{prefix}/dense1", f"{prefix}/dense2")


class BlockNames(NamedTuple):
    """The sublayers of block `<prefix>`: encoder blocks have no cross-attention and two
    LayerNorms (after self-attention, after the FFN); decoder blocks have three."""

    self_attention: str
    cross_attention: str | None
    ffn: str
    norms: tuple[str, ...]


def block_names(side: str, index: int) -> BlockNames:
    prefix = block(side, index)
    decoder = side == "decoder"
    return BlockNames(f"{prefix}/self_attention", f"{prefix}/cross_attention" if decoder else None,
                      f"{prefix}/ffn", tuple(f"{prefix}/ln{k}" for k in range(1, 4 if decoder else 3)))


class LayerNormNames(NamedTuple):
    """LayerNorm `<prefix>` in integer-only mode: the sites of its input (the residual sum), its
    gamma and its output; beta's key in model.npz (on the product grid of gamma and the
    normalized value, like a bias)."""

    input: str
    gamma: str
    beta: str
    output: str


def layer_norm(prefix: str) -> LayerNormNames:
    return LayerNormNames(f"{prefix}/input", f"{prefix}/gamma", f"{prefix}/beta", f"{prefix}/output")


def matmul_of(site: str) -> str | None:
    """The matmul a site feeds: `<dense>/input|weight` -> `<dense>`; Q, K -> `<attn>/scores`;
    P, V -> `<attn>/context`; the decoder output and the embedding table -> OUTPUT_PROJECTION
    (the table also feeds the embedding lookup). None for the integer-only sites of the embedding
    sum and the LayerNorms, which feed no matmul."""
    if site in (EMBEDDING, OUTPUT_INPUT):
        return OUTPUT_PROJECTION
    if site == EMBEDDING_SUM:
        return None
    prefix, leaf = site.rsplit("/", 1)
    if prefix.rsplit("/", 1)[-1].startswith("ln"):
        return None
    return f"{prefix}/{_ATTENTION_MATMUL[leaf]}" if leaf in _ATTENTION_MATMUL else prefix


# --------------------------------------------------------------------------------------------
# The export format
# --------------------------------------------------------------------------------------------

FORMAT_VERSION = 4
MANIFEST, NPZ, SPM, MEM_DIR = "manifest.json", "model.npz", "spm.model", "mem"
GRID_FIELDS = (".bits", ".signed", ".f")  # model.npz keys <site>.bits etc. describe a grid


class ExportError(ValueError):
    """An export directory that cannot be used (missing, corrupt, mismatched, unknown)."""


def grid_arrays(site: str, grid: Grid) -> dict[str, np.ndarray]:
    """`<site>.bits`, `<site>.signed`, `<site>.f` (int32, Grid.f's shape)."""
    return {f"{site}.bits": np.int32(grid.bits), f"{site}.signed": np.bool_(grid.signed),
            f"{site}.f": np.asarray(grid.f).astype(np.int32)}


def grids_of(arrays: Mapping[str, np.ndarray]) -> dict[str, Grid]:
    """Every site's grid from its grid_arrays entries."""
    names = [key[: -len(".bits")] for key in arrays if key.endswith(".bits")]
    return {name: Grid(int(arrays[f"{name}.bits"]), bool(arrays[f"{name}.signed"]),
                       np.asarray(arrays[f"{name}.f"], np.int64)) for name in names}


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block_bytes in iter(lambda: f.read(1 << 20), b""):
            digest.update(block_bytes)
    return digest.hexdigest()


def mem_file_name(key: str) -> str:
    """`encoder/block_1/ffn/dense1/weight` -> `encoder.block_1.ffn.dense1.weight.mem`."""
    return key.replace("/", ".") + ".mem"


def write_mem(path: str, values: np.ndarray, bits: int, signed: bool, comment: str = "") -> None:
    """A `$readmemh` file: one value per line, row-major over `values` (for a weight stored
    [in, out], line i * out + j holds W[i, j]), ceil(bits / 4) hex digits, two's complement
    for signed values (sign-extended to the 4 * digits bits the digits hold). An optional
    first line is a `//` comment.
    """
    digits = -(-bits // 4)
    lo, hi = integer_range(bits, signed)
    flat = np.asarray(values).astype(np.int64).ravel().tolist()  # Python ints: 64-bit words fit
    if flat and (min(flat) < lo or max(flat) > hi):
        raise ValueError(f"{path}: values outside the {bits}-bit range [{lo}, {hi}]")
    mask = (1 << (4 * digits)) - 1
    with open(path, "w") as f:
        if comment:
            f.write(f"// {comment}\n")
        f.write("".join(f"{w & mask:0{digits}x}\n" for w in flat))


def read_mem(path: str, bits: int, signed: bool) -> np.ndarray:
    """Parse a `write_mem` file back into int64 values (1-D): the low `bits` bits of each hex
    word, two's complement when signed; `//` comment lines and blank lines are skipped."""
    values = []
    with open(path) as f:
        for line in f:
            line = line.split("//", 1)[0].strip()
            if line:
                word = int(line, 16) & ((1 << bits) - 1)
                values.append(word - (1 << bits) if signed and word >> (bits - 1) else word)
    return np.array(values, np.int64)


def read_manifest(export_dir: str) -> dict:
    """manifest.json of an export, checked for its format version and required sections."""
    path = os.path.join(export_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read the manifest ({e.__class__.__name__})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format version {version!r}, but this code reads version "
                          f"{FORMAT_VERSION}: re-export it with export.py")
    if not manifest.get("sites"):
        raise ExportError(f"{path}: export from a float checkpoint (no quantization sites)")
    for key in ("model", "npz", "spm"):
        if key not in manifest:
            raise ExportError(f"{path}: no {key!r} section")
    return manifest


def verify_file(path: str, sha256: str, what: str) -> None:
    """ExportError unless `path` exists with this SHA-256."""
    if not os.path.isfile(path):
        raise ExportError(f"{path}: {what} missing")
    if sha256_file(path) != sha256:
        raise ExportError(f"{path}: {what} checksum mismatch (SHA-256 differs from the manifest)")


def load_arrays(export_dir: str, manifest: dict) -> dict[str, np.ndarray]:
    """The arrays of model.npz after verifying its checksum; integer weights required."""
    path = os.path.join(export_dir, NPZ)
    verify_file(path, manifest["npz"]["sha256"], NPZ)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ExportError(f"{path}: corrupt {NPZ} ({e.__class__.__name__})") from None
    not_arrays = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if not_arrays:  # NpzFile hands members that are not .npy files back as raw bytes
        raise ExportError(f"{path}: corrupt {NPZ} ({not_arrays[0]!r} is not an array)")
    missing = [key for key in (EMBEDDING, EMBEDDING + ".bits") if key not in arrays]
    if missing:
        raise ExportError(f"{path}: corrupt {NPZ} (no {missing[0]!r})")
    if arrays[EMBEDDING].dtype.kind not in "iu":
        raise ExportError(f"{path}: {EMBEDDING!r} holds {arrays[EMBEDDING].dtype}, "
                          "not integers (an export from a float checkpoint?)")
    return arrays
