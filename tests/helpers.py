"""What the tests of the commands share: tiny-model flags, corpus files, running a command, and
reading its results."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

# eval.py's main, for the tests that run it in-process (`import eval` would shadow the builtin)
eval_main = importlib.import_module("eval").main


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TINY = ["--d_model", "32", "--d_ff", "64", "--num_blocks", "1", "--num_heads", "4",
        "--vocab_size", "300", "--batch_tokens", "400", "--warmup_steps", "30", "--lr", "3e-3"]


def write_pairs(folder, name, pairs):
    for side, lang in ((0, "de"), (1, "en")):
        with open(os.path.join(folder, f"{name}.{lang}"), "w") as f:
            f.write("\n".join(p[side] for p in pairs) + "\n")
    return [os.path.join(folder, f"{name}.{lang}") for lang in ("de", "en")]


def checkpoint_values(logdir, step=None):
    """Every saved value of the latest checkpoint of logdir (or of ckpt-<step>), by name."""
    folder = os.path.join(logdir, "ckpt")
    reader = tf.train.load_checkpoint(folder if step is None else os.path.join(folder, f"ckpt-{step}"))
    skip = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter")
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.split("/")[0] not in skip)
    return {n: reader.get_tensor(n) for n in names}


def train_set_bleu(logdir, corpus, out):
    eval_main(["--logdir", logdir, "--src", corpus["train"][0], "--ref", corpus["train"][1], "--json", out])
    return json.load(open(out))


def npz_arrays(export_dir):
    with np.load(os.path.join(export_dir, "model.npz")) as npz:
        return {key: npz[key] for key in npz.files}


def run_cli(script, *args):
    """python <script> args, from the repository, as a user runs it."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def assert_one_line_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in err[-1], err[-1]
