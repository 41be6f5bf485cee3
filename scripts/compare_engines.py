"""Compare the TF fake-quant model with the integer engine, site by site.

    python scripts/compare_engines.py --logdir DIR --export DIR [--n 8]

Runs both on the first n test sentences (teacher-forced forward over the references) and
names the first site, in execution order, whose integers differ, with the largest difference
in integer units (integer_tf/compare.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm

import hparams
import runs
from integer import export_format, loader
from integer_tf.compare import first_test_batch, report, site_differences


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--logdir", required=True, help="the quantized train.py run")
    p.add_argument("--export", required=True, help="its export directory (eval.py --export_to)")
    p.add_argument("--n", type=hparams.POSITIVE, default=8, help="test sentences in the batch")
    args = p.parse_args(argv)
    model, hp, spm_path = runs.load_quantized(args.logdir)
    engine = loader.load_engine(args.export)
    if export_format.sha256_file(spm_path) != engine.manifest["spm"]["sha256"]:
        raise ValueError(f"{spm_path}: spm model mismatch: {args.export} was exported with another")
    src, tgt_in = first_test_batch(hp, spm.SentencePieceProcessor(model_file=spm_path), args.n)
    print(report(*site_differences(model, engine, src, tgt_in)))


if __name__ == "__main__":
    hparams.run_cli(main)
