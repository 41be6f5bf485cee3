"""Export a TQT-quantized Transformer for hardware: python export.py --logdir DIR --out DIR.

The export directory (written atomically: a temp directory beside it, renamed when complete):

    model.npz      integer weights keyed by site name (`encoder/block_1/ffn/dense1/weight`,
                   `embedding/weight`), q = clip(R(w * 2^f), n, p) in the smallest signed type
                   (int8 for <= 8 bits, int16 for <= 16); biases `<dense>/bias` as int32 on the
                   accumulator grid 2^-(f_x + f_w); LayerNorm `<block>/lnK/gamma|beta` float32;
                   for every site `<site>.bits`, `<site>.signed`, `<site>.f` (scale 2^-f; f is
                   a vector [out] for per-channel weights)
    manifest.json  format version, hparams, rounding, the engine's model config, SHA-256 of
                   model.npz and spm.model, the site table (name, role, shape, bits, signed, f,
                   the matmul it feeds)
    spm.model      the SentencePiece model
    mem/           one `$readmemh` file per integer tensor (`intmodel.write_mem`): two's
                   complement hex, ceil(bits / 4) digits, one value per line, row-major over
                   the stored shape ([in, out] for dense weights, [vocab, d_model] for the
                   embedding), after one `//` comment line

`intmodel.IntTransformer.load` reads it without TensorFlow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

import eval as evaluation
import hparams
import intmodel
import quant
from model import Transformer
from modules import Dense, LayerNorm

# everything eval.py needs to evaluate an export on its own (model, data and quantization flags)
HPARAM_KEYS = hparams.MODEL_FLAGS + hparams.DATA_FLAGS + hparams.QUANT_FLAGS + ("decode_margin",)


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
    return _exact_integers(v, intmodel.int_dtype(site.num_bits, site.signed), site.site_name)


def bias_integers(dense: Dense) -> np.ndarray:
    """q_b = clip(round(b * 2^(f_x + f_w)), int32), as quant.quantize_bias computes it."""
    f_acc = dense.x_site.frac_bits() + dense.w_site.frac_bits()
    y = quant.quantize_bias(dense.b, f_acc)
    v = y.numpy().astype(np.float64) * np.exp2(f_acc.astype(np.float64))
    return _exact_integers(v, np.dtype(np.int32), f"{dense.w_site.site_name} bias")


def site_fields(site: quant.QuantSite) -> dict[str, np.ndarray]:
    """`<site>.bits`, `<site>.signed`, `<site>.f` (int32, [] or [channels])."""
    return {f"{site.site_name}.bits": np.int32(site.num_bits),
            f"{site.site_name}.signed": np.bool_(site.signed),
            f"{site.site_name}.f": site.frac_bits().astype(np.int32)}


def _tree(module: tf.Module) -> list[tf.Module]:
    return [module, *module.submodules]


def quantized_arrays(module: tf.Module) -> dict[str, np.ndarray]:
    """Grid fields of every QuantSite in `module` (itself included), and each Dense layer's
    integer weight (keyed by its site name) and int32 bias (`<dense>/bias`)."""
    arrays: dict[str, np.ndarray] = {}
    for site in (m for m in _tree(module) if isinstance(m, quant.QuantSite)):
        arrays.update(site_fields(site))
    for dense in (m for m in _tree(module) if isinstance(m, Dense)):
        arrays[dense.w_site.site_name] = weight_integers(dense.w_site, dense.w)
        if dense.b is not None:
            arrays[dense.w_site.site_name.removesuffix("/weight") + "/bias"] = bias_integers(dense)
    return arrays


def layer_norms(model: Transformer) -> dict[str, LayerNorm]:
    """Every LayerNorm by its full name, `encoder/block_1/ln1` ..."""
    norms = {}
    for side, blocks in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, block in enumerate(blocks):
            for attr in ("ln1", "ln2", "ln3"):
                if hasattr(block, attr):
                    norms[f"{side}/block_{i + 1}/{attr}"] = getattr(block, attr)
    return norms


def model_arrays(model: Transformer) -> dict[str, np.ndarray]:
    """Everything model.npz holds: quantized_arrays, the integer embedding table, LayerNorms."""
    arrays = quantized_arrays(model)
    arrays["embedding/weight"] = weight_integers(model.embedding_site, model.embedding)
    for name, norm in layer_norms(model).items():
        arrays[f"{name}/gamma"] = norm.gamma.numpy().astype(np.float32)
        arrays[f"{name}/beta"] = norm.beta.numpy().astype(np.float32)
    return arrays


def model_config(model: Transformer) -> dict:
    """What the integer engine needs beyond the arrays."""
    return {"num_heads": model.num_heads, "num_blocks": len(model.encoder),
            "decode_margin": int(model.margin), "rounding": model.sites.config.rounding,
            "layer_norm_eps": model.encoder[0].ln1.eps, "d_model": model.d_model,
            "vocab": model.vocab_size}


def site_table(model: Transformer, arrays: dict[str, np.ndarray]) -> list[dict]:
    """One row per site in creation order: name, role, shape, bits, signed, f, matmul."""
    rows = []
    for name, site in model.sites.sites.items():
        f = site.frac_bits()
        rows.append({"name": name, "role": site.role,
                     "shape": list(arrays[name].shape) if name in arrays else None,
                     "bits": site.num_bits, "signed": site.signed,
                     "f": f.tolist(), "matmul": intmodel.matmul_of(name)})
    return rows


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a fresh temp directory beside `out_dir`; when the block completes, it replaces
    `out_dir` (an existing one is moved aside first and deleted after). On any exception the
    temp directory is removed and `out_dir` is left as it was."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_directory(new: str, target: str) -> None:
    if not os.path.exists(target):
        os.rename(new, target)
        return
    old = new + "-old"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_mem_files(mem_dir: str, arrays: dict[str, np.ndarray], grids: dict[str, intmodel.Grid]) -> None:
    """mem/<key>.mem for every integer weight (its site's bits) and bias (32 bits)."""
    os.makedirs(mem_dir)
    for key, values in arrays.items():
        if key in grids:
            bits, signed = grids[key].bits, grids[key].signed
        elif key.endswith("/bias"):
            bits, signed = intmodel.BIAS_BITS, True
        else:
            continue
        comment = f"{key} shape {list(values.shape)} int{bits} row-major"
        intmodel.write_mem(os.path.join(mem_dir, intmodel.mem_file_name(key)), values, bits, signed,
                           comment)


def export_model(model: Transformer, hp: argparse.Namespace, spm_path: str, out_dir: str) -> dict:
    """Write the export of a quantized `model` into `out_dir` atomically; returns the manifest.

    Raises ValueError for a float model (modules.FloatSites)."""
    if not isinstance(model.sites, quant.TQTSites):
        raise ValueError("export needs a quantized model (--quant ...)")
    arrays = model_arrays(model)
    grids = intmodel.grids_of(arrays)
    with atomic_directory(out_dir) as tmp:
        shutil.copyfile(spm_path, os.path.join(tmp, "spm.model"))
        np.savez(os.path.join(tmp, "model.npz"), **arrays)
        write_mem_files(os.path.join(tmp, "mem"), arrays, grids)
        manifest = {
            "format_version": intmodel.FORMAT_VERSION,
            "quantized": True,
            "hparams": {key: getattr(hp, key, None) for key in HPARAM_KEYS},
            "rounding": model.sites.config.rounding,
            "model": model_config(model),
            "npz": {"path": "model.npz", "sha256": intmodel.sha256_file(os.path.join(tmp, "model.npz"))},
            "spm": {"path": "spm.model", "source": os.path.abspath(spm_path),
                    "sha256": intmodel.sha256_file(os.path.join(tmp, "spm.model"))},
            "mem": {"dir": "mem", "format": "$readmemh, two's complement, ceil(bits/4) hex digits, "
                                            "row-major over the stored shape"},
            "sites": site_table(model, arrays),
        }
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def load_quantized(logdir: str, checkpoint: str | None = None) -> tuple[Transformer, argparse.Namespace, str]:
    """The model of a train.py logdir with its hparams (quantization flags included), the
    checkpoint restored; also its SentencePiece model path. A checkpoint without thresholds
    (a float run) is a ValueError: its grids would be uncalibrated."""
    argv = ["--logdir", logdir] + (["--checkpoint", checkpoint] if checkpoint else [])
    hp = evaluation.restore_hparams(hparams.eval_parser(), argv)
    model, _, path, has_thresholds = evaluation.load_model(hp)
    if isinstance(model.sites, quant.TQTSites) and not has_thresholds:
        raise ValueError(f"checkpoint {path} has no quantization thresholds (a float checkpoint): "
                         "calibrate or fine-tune it with --quant first")
    return model, hp, os.path.join(logdir, "spm.model")


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="Export a quantized model for the integer engine.")
    p.add_argument("--logdir", required=True, help="a train.py --logdir of a quantized run")
    p.add_argument("--out", required=True, help="export directory (replaced atomically)")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint prefix (default: latest)")
    args = p.parse_args(argv)
    model, hp, spm_path = load_quantized(args.logdir, args.checkpoint)
    manifest = export_model(model, hp, spm_path, args.out)
    print(f"exported {len(manifest['sites'])} sites to {args.out}")


if __name__ == "__main__":
    hparams.run_cli(main)
