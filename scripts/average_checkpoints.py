"""Average a run's last N checkpoints (or its N best by dev BLEU) into <logdir>/averaged.

    python scripts/average_checkpoints.py --logdir DIR --last 5   # DIR/ckpt (--keep_checkpoints 5)
    python scripts/average_checkpoints.py --logdir DIR --best 3   # DIR/best (--keep_best 3)
    python eval.py --logdir DIR --checkpoint averaged

Every variable is the mean of its values in the chosen checkpoints (the quantization thresholds'
log2_t too, for a QAT run); DIR/averaged/average.json names the sources.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # noqa: E402

import hparams  # noqa: E402
import runs  # noqa: E402


def sources(logdir: str, last: int, best: int) -> list[str]:
    """The checkpoint prefixes to average: the `last` latest of <logdir>/ckpt, or the `best` best."""
    if best:
        kept = runs.kept_best(logdir)
        if len(kept) < best:
            raise ValueError(f"--best {best}: {logdir}/best keeps {len(kept)} checkpoint(s) "
                             f"(train with --keep_best {best})")
        return [runs.best_prefix(logdir, e) for e in kept[:best]]
    state = tf.train.get_checkpoint_state(os.path.join(logdir, "ckpt"))
    paths = list(state.all_model_checkpoint_paths) if state else []
    if len(paths) < last:
        raise ValueError(f"--last {last}: {logdir}/ckpt keeps {len(paths)} checkpoint(s) "
                         f"(train with --keep_checkpoints {last})")
    return paths[-last:]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--logdir", required=True, help="a train.py log directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=hparams.COUNT, default=0, help="average the N latest checkpoints")
    which.add_argument("--best", type=hparams.COUNT, default=0, help="average the N best checkpoints")
    args = p.parse_args(argv)
    if max(args.last, args.best) < 1:
        raise ValueError("--last / --best must be at least 1")
    paths = sources(args.logdir, args.last, args.best)
    hp = runs.restore_hparams(hparams.eval_parser(), ["--logdir", args.logdir, "--checkpoint", paths[-1]])
    model = runs.load_model(hp)[0]
    runs.average_weights(model, paths)
    folder = os.path.join(args.logdir, runs.AVERAGED)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), folder, max_to_keep=1)
    path = manager.save()
    hparams.write_json(os.path.join(folder, "average.json"),
                       {"checkpoint": os.path.basename(path), "sources": [os.path.relpath(s, args.logdir)
                                                                          for s in paths]})
    print(f"averaged {len(paths)} checkpoints into {path}; evaluate with "
          f"eval.py --logdir {args.logdir} --checkpoint averaged")


if __name__ == "__main__":
    hparams.run_cli(main)
