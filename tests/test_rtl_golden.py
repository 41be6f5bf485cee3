"""The RTL units reproduce a real export's golden vectors: an integer-only W8A8 model trained on the
demo corpus (conftest's intonly_run), one dev sentence dumped by eval.py, and every op of its pass
replayed through the units (hw/golden.py: cocotb on Icarus for every op, the plain Verilator benches
for every LayerNorm and softmax, reading the export's and the vectors' own mem files)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from eval import main as eval_main
from hw import block, golden, params

pytestmark = pytest.mark.usefixtures("hw_tools")


@pytest.fixture(scope="module")
def vectors(intonly_run, corpus, tmp_path_factory):
    """Golden vectors of the shortest dev sentence (the RTL benches run every matmul one MAC a cycle)."""
    folder = tmp_path_factory.mktemp("rtl")
    with open(corpus["dev"][0]) as f:
        shortest = min(f.read().splitlines(), key=len)
    (folder / "src.de").write_text(shortest + "\n")
    export_dir = os.path.join(intonly_run, "export")
    eval_main(["--engine", "int", "--export", export_dir, "--src", str(folder / "src.de"),
               "--dump_vectors", "1",
               "--out", str(folder / "vec")])
    return export_dir, str(folder / "vec"), folder


def test_every_op_of_a_sentence_through_the_rtl(vectors):
    export_dir, vec, folder = vectors
    with open(os.path.join(vec, "index.json")) as f:
        ops = json.load(f)["sentences"][0]["ops"]
    results = golden.replay(vec, export_dir, str(folder / "work"))
    kinds = {op["op"] for op in ops}
    assert kinds == {"embedding_sum", "requantize", "matmul", "relu", "residual", "layer_norm", "softmax",
                     "argmax"}
    assert results["ops"] == {kind: sum(op["op"] == kind for op in ops) for kind in kinds}
    vectors_npz = np.load(os.path.join(vec, "sentence_0", "vectors.npz"))
    # what each bench counts: elements (the combinational units), output rows (the others)
    size = {op["call"]: vectors_npz[op["output"]["key"]].size for op in ops}
    rows = {op["call"]: size[op["call"]] // vectors_npz[op["output"]["key"]].shape[-1] for op in ops}
    expected = {"embedding_sum": sum(size[o["call"]] for o in ops if o["op"] == "embedding_sum"),
                "relu": sum(size[o["call"]] for o in ops if o["op"] == "relu"),
                "residual": sum(size[o["call"]] for o in ops if o["op"] == "residual"),
                "requantize": sum(size[o["call"]] for o in ops if o["op"] == "requantize"),
                "mac": sum(rows[o["call"]] for o in ops if o["op"] == "matmul"),
                "layer_norm": sum(rows[o["call"]] for o in ops if o["op"] == "layer_norm"),
                "softmax": sum(rows[o["call"]] for o in ops if o["op"] == "softmax"),
                "argmax": sum(size[o["call"]] for o in ops if o["op"] == "argmax")}
    got = {key: counts["passed"] for key, counts in results["cocotb"].items()}
    got["requantize"] = sum(got.pop(k) for k in list(got) if k.startswith("requantize"))
    assert got == expected
    assert all(counts["failed"] == 0 for counts in results["cocotb"].values())
    for unit in ("layer_norm", "softmax"):
        counts = results["verilator"][unit]
        assert (counts["ops"], counts["passed"], counts["failed"]) == (
            results["ops"][unit], expected[unit], 0)


def test_the_parameters_come_from_the_export(vectors):
    """hw/params.py: the units' widths are the manifest's proven ones, each op's settings its own."""
    export_dir, vec, _ = vectors
    hw = params.export_params(export_dir)
    with open(os.path.join(export_dir, "manifest.json")) as f:
        manifest = json.load(f)
    norms = [op for op in manifest["ops"] if op["op"] == "layer_norm"]
    softmaxes = [op for op in manifest["ops"] if op["op"] == "softmax"]
    assert hw["layer_norm"]["D"] == manifest["model"]["d_model"]
    for step, name in (("s", "S_W"), ("c", "C_W"), ("W", "W_W")):
        assert hw["layer_norm"][name] == max(op["steps"][step]["bits"] for op in norms)
    assert hw["softmax"]["L_W"] == softmaxes[0]["steps"]["L"]["bits"]
    assert hw["softmax"]["S_W"] == max(op["steps"]["S"]["bits"] for op in softmaxes)
    assert [hw["softmax"][k] for k in ("Q_LN2", "Q_B", "Q_C")] == manifest["model"]["softmax_constants"]
    for op in norms:
        setting = hw["ops"][op["name"]]
        assert setting["out_shift"] == op["params"]["f_gamma"] + op["params"]["F"] - op["output"]["f"]
    for op in softmaxes:
        assert hw["ops"][op["name"]]["shift"] == op["params"]["f"] - op["params"]["F"]


def test_an_encoder_block_in_rtl(vectors, monkeypatch):
    """hw/block.py: encoder block 1 as a program on tqt_block_engine (the units composed, on Verilator),
    from the block's input in the golden vectors: every op's output, the block's output (ln2) included,
    equals the engine's. With one LayerNorm's output shift off by one the comparison fails."""
    export_dir, vec, folder = vectors
    result = block.run_block(vec, export_dir, str(folder / "block"))
    assert [op["name"] for op in result["ops"]][-1] == "encoder/block_1/ln2/output"
    assert result["output_equal"] and result["failed"] == 0 and result["passed"] == len(result["ops"]) == 23
    assert result["cycles"] > 0

    export_params = block.hw_params.export_params

    def shifted(export_dir):
        found = export_params(export_dir)
        found["ops"]["encoder/block_1/ln2/output"]["out_shift"] += 1
        return found

    monkeypatch.setattr(block.hw_params, "export_params", shifted)
    wrong = block.run_block(vec, export_dir, str(folder / "block"))
    assert not wrong["output_equal"] and [op["name"] for op in wrong["ops"] if not op["equal"]] == [
        "encoder/block_1/ln2/output"]
