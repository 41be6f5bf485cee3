"""The export format: version, file names, model.npz keys, the manifest, `$readmemh` mem files and
SHA-256 checksums. Written by integer_tf/export.py, read by the integer engines (integer/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Mapping

import numpy as np

from integer import fixed_point, site_names

FORMAT_VERSION = 4
MANIFEST, NPZ, SPM, MEM_DIR = "manifest.json", "model.npz", "spm.model", "mem"
GRID_FIELDS = (".bits", ".signed", ".f")  # model.npz keys <site>.bits etc. describe a grid


class ExportError(ValueError):
    """An export directory that cannot be used (missing, corrupt, mismatched, unknown)."""


def grid_arrays(site: str, grid: fixed_point.Grid) -> dict[str, np.ndarray]:
    """`<site>.bits`, `<site>.signed`, `<site>.f` (int32, fixed_point.Grid.f's shape)."""
    return {f"{site}.bits": np.int32(grid.bits), f"{site}.signed": np.bool_(grid.signed),
            f"{site}.f": np.asarray(grid.f).astype(np.int32)}


def grids_of(arrays: Mapping[str, np.ndarray]) -> dict[str, fixed_point.Grid]:
    """Every site's grid from its grid_arrays entries."""
    names = [key[: -len(".bits")] for key in arrays if key.endswith(".bits")]
    return {name: fixed_point.Grid(int(arrays[f"{name}.bits"]), bool(arrays[f"{name}.signed"]),
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
    lo, hi = fixed_point.integer_range(bits, signed)
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
                          f"{FORMAT_VERSION}: re-export it (python -m integer_tf.export)")
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
    missing = [key for key in (site_names.EMBEDDING, site_names.EMBEDDING + ".bits") if key not in arrays]
    if missing:
        raise ExportError(f"{path}: corrupt {NPZ} (no {missing[0]!r})")
    if arrays[site_names.EMBEDDING].dtype.kind not in "iu":
        raise ExportError(f"{path}: {site_names.EMBEDDING!r} holds {arrays[site_names.EMBEDDING].dtype}, "
                          "not integers (an export from a float checkpoint?)")
    return arrays
