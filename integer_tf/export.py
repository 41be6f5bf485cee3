"""Export a TQT-quantized Transformer for hardware: python -m integer_tf.export --logdir DIR --out DIR.

The export directory (written atomically: a temp directory beside it, renamed when complete;
the format is defined in `integer/export_format.py`, version `export_format.FORMAT_VERSION`):

    model.npz      integer weights keyed by site name (`encoder/block_1/ffn/dense1/weight`,
                   `embedding/weight`), q = clip(R(w * 2^f), n, p) in the smallest signed type
                   (int8 for <= 8 bits, int16 for <= 16); biases `<dense>/bias` as int32 on the
                   accumulator grid 2^-(f_x + f_w); LayerNorm `<block>/lnK/gamma|beta` float32;
                   for every site `<site>.bits`, `<site>.signed`, `<site>.f` (scale 2^-f; f is
                   a vector [out] for per-channel weights, [vocab, 1] for the embedding with
                   --per_row_embedding: one per row, the output channels of the logits)
    manifest.json  format version, hparams, the engine's model config (rounding included),
                   SHA-256 of model.npz and spm.model, the site table (name, role, shape, bits,
                   signed, f, the matmul it feeds)
    spm.model      the SentencePiece model
    mem/           one `$readmemh` file per integer tensor (`export_format.write_mem`): two's
                   complement hex, ceil(bits / 4) digits, one value per line, row-major over
                   the stored shape ([in, out] for dense weights, [vocab, d_model] for the
                   embedding), after one `//` comment line

`integer.loader.load_engine` reads it without TensorFlow (through `integer.export_format`).
"""

from __future__ import annotations

import hparams

if __name__ == "__main__":  # --help and a mistyped flag are answered before TensorFlow loads
    hparams.check_command_line(hparams.export_parser())

import argparse
import json
import os
import shutil

import numpy as np
import sentencepiece as spm
import tensorflow as tf

import data_load
import quant
import runs
from integer import (
    atomic_files,
    datasheet,
    decoding,
    export_format,
    fixed_point,
    golden_vectors,
    intonly_engine,
    kernels,
    matmul_engine,
    site_names,
    token_ids,
)
from integer_tf import intonly_layers
from model import Transformer
from modules import Dense, LayerNorm, positional_encoding

# --------------------------------------------------------------------------------------------
# Integers, as the training graph computes them
# --------------------------------------------------------------------------------------------


def _exact_integers(v: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    r = np.rint(v)
    if not np.array_equal(r, v):
        raise ValueError(f"{name}: quantized values are not integers on the grid")
    return r.astype(dtype)


def weight_integers(site: quant.QuantSite, w: tf.Variable) -> np.ndarray:
    """q = clip(R(w * 2^f), n, p), read off the graph's own op: tqt_fake_quant(w) * 2^f
    (exact: a power-of-two scale; f per output channel broadcasts along the last axis)."""
    y = quant.tqt_fake_quant(w, site.log2_t, site.num_bits, site.signed, site.rounding)
    v = y.numpy().astype(np.float64) * np.exp2(site.frac_bits().astype(np.float64))
    return _exact_integers(v, fixed_point.int_dtype(site.num_bits, site.signed), site.site_name)


def bias_integers(dense: Dense) -> np.ndarray:
    """q_b = clip(round(b * 2^(f_x + f_w)), int32), as quant.quantize_bias computes it."""
    f_acc = dense.x_site.frac_bits() + dense.w_site.frac_bits()
    y = quant.quantize_bias(dense.b, f_acc)
    v = y.numpy().astype(np.float64) * np.exp2(f_acc.astype(np.float64))
    return _exact_integers(v, fixed_point.int_dtype(fixed_point.BIAS_BITS), dense.names.bias)


def _tree(module: tf.Module) -> list[tf.Module]:
    return [module, *module.submodules]


def quantized_arrays(module: tf.Module) -> dict[str, np.ndarray]:
    """Grid fields of every QuantSite in `module` (itself included), and each Dense layer's
    integer weight (keyed by its site name) and int32 bias (`<dense>/bias`)."""
    arrays: dict[str, np.ndarray] = {}
    for site in (m for m in _tree(module) if isinstance(m, quant.QuantSite)):
        arrays.update(export_format.grid_arrays(site.site_name, site.grid()))
    for dense in (m for m in _tree(module) if isinstance(m, Dense)):
        arrays[dense.names.weight] = weight_integers(dense.w_site, dense.w)
        if dense.b is not None:
            arrays[dense.names.bias] = bias_integers(dense)
    return arrays


def model_arrays(model: Transformer, max_positions: int = hparams.DEFAULT_MAX_POSITIONS
                 ) -> dict[str, np.ndarray]:
    """Everything model.npz holds: quantized_arrays, the integer embedding table, and every
    LayerNorm's `<name>/gamma` and `<name>/beta` (float32); integer-only: gamma on its site,
    beta (int64 on f_gamma + LN_F) and `<name>/eps_q`, and the embedding sum's tables
    `embedding_sum/lookup` and `embedding_sum/positions` (`max_positions` rows)."""
    arrays = quantized_arrays(model)
    arrays[site_names.EMBEDDING] = weight_integers(model.embedding_site, model.embedding)
    for norm in (m for m in model.submodules if isinstance(m, LayerNorm)):
        if isinstance(norm, intonly_layers.IntLayerNorm):
            site = norm.gamma_site
            arrays[f"{norm.path}/gamma"] = norm.gamma_integers().numpy().astype(
                fixed_point.int_dtype(site.num_bits, site.signed))
            arrays[f"{norm.path}/beta"] = norm.beta_integers().numpy()
            arrays[f"{norm.path}/eps_q"] = norm.eps_integer().numpy()
        else:
            arrays[f"{norm.path}/gamma"] = norm.gamma.numpy().astype(np.float32)
            arrays[f"{norm.path}/beta"] = norm.beta.numpy().astype(np.float32)
    if isinstance(model.embedding_sum, intonly_layers.IntEmbeddingSum):
        site, dtype = model.embedding_sum.site, fixed_point.int_dtype(model.embedding_sum.site.num_bits)
        lookup = model.embedding_sum.lookup_integers(model.table())
        positions = model.embedding_sum.position_integers(positional_encoding(max_positions, model.d_model))
        arrays[f"{site.site_name}/lookup"] = lookup.numpy().astype(dtype)
        arrays[f"{site.site_name}/positions"] = positions.numpy().astype(dtype)
    return arrays


def model_config(model: Transformer) -> dict:
    """What the integer engine needs beyond the arrays (integer-only: the kernels' constants)."""
    config = {"num_heads": model.num_heads, "num_blocks": len(model.encoder),
              "decode_margin": int(model.margin), "rounding": model.sites.config.rounding,
              "layer_norm_eps": model.encoder[0].ln1.eps, "d_model": model.d_model,
              "vocab": model.vocab_size, "integer_only": bool(model.sites.config.integer_only)}
    if config["integer_only"]:
        config.update(kernels.intonly_constants(model.d_k, model.sites.config.normalization))
    return config


def site_table(model: Transformer, arrays: dict[str, np.ndarray]) -> list[dict]:
    """One row per site in creation order: name, role, shape, bits, signed, f, matmul."""
    rows = []
    for name, site in model.sites.sites.items():
        f = site.frac_bits()
        rows.append({"name": name, "role": site.role,
                     "shape": list(arrays[name].shape) if name in arrays else None,
                     "bits": site.num_bits, "signed": site.signed,
                     "f": f.tolist(), "matmul": site_names.matmul_of(name)})
    return rows


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_mem_files(mem_dir: str, arrays: dict[str, np.ndarray], grids: dict[str, fixed_point.Grid]) -> None:
    """mem/<key>.mem for every integer weight (its site's bits), bias (32 bits) and integer-only
    constant: LayerNorm beta (49 bits) and eps_q (64), the embedding sum's lookup and position
    tables (its site's bits); each header names the grid f (a bias on f_x + f_w, beta on
    f_gamma + LN_F, eps_q on 2 f_in)."""
    os.makedirs(mem_dir)
    for key, values in arrays.items():
        table = key.rsplit("/", 1)[0]
        if key in grids:
            bits, signed, f = grids[key].bits, grids[key].signed, grids[key].f
        elif key.endswith("/bias"):
            names = site_names.dense(table)
            bits, signed, f = fixed_point.BIAS_BITS, True, grids[names.input].f + grids[names.weight].f
        elif key.endswith("/beta") and values.dtype.kind == "i":
            bits, signed = kernels.LN_MAX_ABS_BETA.bit_length(), True
            f = grids[site_names.layer_norm(table).gamma].f + kernels.LN_F
        elif key.endswith("/eps_q"):
            bits, signed, f = 64, True, 2 * grids[site_names.layer_norm(table).input].f
        elif table == site_names.EMBEDDING_SUM and table in grids:
            bits, signed, f = grids[table].bits, grids[table].signed, grids[table].f
        else:
            continue
        grid = f"f {int(f)}" if np.ndim(f) == 0 else "f vector"
        comment = f"{key} shape {list(values.shape)} {'int' if signed else 'uint'}{bits} {grid} row-major"
        export_format.write_mem(os.path.join(mem_dir, export_format.mem_file_name(key)), values, bits, signed,
                                comment)


def data_sheet(arrays: dict[str, np.ndarray], config: dict, sources: list[list[int]]) -> dict:
    """The manifest's data sheet, found by running the NumPy engine on the model itself: `ops`,
    every op of the first source's pass in execution order with its grids, shifts and proven widths
    (golden_vectors.op_table); integer-only also `edges`, every grid change (shift and rounding),
    and `accumulators`, per matmul and reduction the proven bound (the design value) beside the
    largest value observed while greedy-decoding `sources` (token id rows)."""
    integer_only = config["integer_only"]
    engine_class = intonly_engine.IntOnlyTransformer if integer_only else matmul_engine.IntTransformer
    engine = engine_class(arrays, config)
    sheet = {"ops": golden_vectors.op_table(engine, sources[0])}
    if not integer_only:
        return sheet
    engine.observe = True
    for start in range(0, len(sources), 16):
        decoding.greedy(engine, token_ids.pad_batch(sources[start:start + 16]))
    accumulators = {name: {"proven_max_abs": e["proven_max_abs"], "proven_bits": e["proven_bits"],
                           "observed_max_abs": e["max_abs"], "observed_bits": e["bits"]}
                    for name, e in engine.accumulator_stats().items()}
    return {**sheet, "observed_on": f"greedy decoding of {len(sources)} sentences", "edges": engine.edges(),
            "accumulators": accumulators}


def observed_sources(model: Transformer, hp: argparse.Namespace, spm_path: str,
                     n: int = hparams.OBSERVE_SENTENCES) -> list[list[int]] | None:
    """The first `n` dev sentences as token ids: what an integer-only export's data sheet observes
    (None for a matmul-only model, or n = 0)."""
    if not model.sites.config.integer_only or n == 0:
        return None
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    return data_load.encode_source(sp, runs.load_corpus(hp)["dev"][0][:n])


def portable(value):
    """A flag's value as an export records it: an absolute path becomes relative to the working
    folder (the run's corpus is provenance: the engines read nothing outside the export)."""
    return os.path.relpath(value) if isinstance(value, str) and os.path.isabs(value) else value


def export_model(model: Transformer, hp: argparse.Namespace, spm_path: str, out_dir: str,
                 sources: list[list[int]] | None = None, max_positions: int = hparams.DEFAULT_MAX_POSITIONS
                 ) -> dict:
    """Write the export of a quantized `model` into `out_dir` atomically; returns the manifest.
    The data sheet (`data_sheet`; `datasheet.md` renders it) traces the first of `sources` (token
    ids; default: one short dummy sentence); integer-only: `max_positions` rows of positions, and
    the edges and accumulators observed on `sources`.

    Raises ValueError for a float model (modules.FloatSites)."""
    if not isinstance(model.sites, quant.TQTSites):
        raise ValueError("export needs a quantized model (--quant ...)")
    arrays = model_arrays(model, max_positions)
    config = model_config(model)
    with atomic_files.atomic_directory(out_dir) as tmp:
        shutil.copyfile(spm_path, os.path.join(tmp, export_format.SPM))
        np.savez(os.path.join(tmp, export_format.NPZ), **arrays)
        write_mem_files(os.path.join(tmp, export_format.MEM_DIR), arrays, export_format.grids_of(arrays))
        manifest = {
            "format_version": export_format.FORMAT_VERSION,
            "hparams": {key: portable(getattr(hp, key, None)) for key in hparams.SAVED_FLAGS},
            "model": config,
            "npz": {"path": export_format.NPZ,
                    "sha256": export_format.sha256_file(os.path.join(tmp, export_format.NPZ))},
            "spm": {"path": export_format.SPM,
                    "sha256": export_format.sha256_file(os.path.join(tmp, export_format.SPM))},
            "mem": {"dir": export_format.MEM_DIR, "format": "$readmemh, two's complement, ceil(bits/4) hex "
                                                      "digits, row-major over the stored shape"},
            "sites": site_table(model, arrays),
        }
        manifest.update(data_sheet(arrays, config, sources or [[4, 5, 6, token_ids.EOS]]))
        with open(os.path.join(tmp, export_format.MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        title = os.path.basename(os.path.abspath(out_dir))
        datasheet.write(manifest, os.path.join(tmp, datasheet.DATASHEET), title)
    return manifest


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    args = hparams.export_parser().parse_args(argv)
    atomic_files.check_replaceable(args.out, export_format.MANIFEST, "--out")
    model, hp, spm_path = runs.load_quantized(args.logdir, args.checkpoint)
    sources = observed_sources(model, hp, spm_path, args.observe_sentences)
    manifest = export_model(model, hp, spm_path, args.out, sources, args.max_positions)
    print(f"exported {len(manifest['sites'])} sites to {args.out}")


if __name__ == "__main__":
    hparams.run_cli(main)
