"""hw/params.py: the RTL units' parameters are the kernels' proven widths, the constant division is
exact, and what the units cannot do is refused. NumPy only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hw import params
from integer import accumulation, kernels


@pytest.mark.parametrize("divisor", [3, 5, 7, 10, 255, 641, 22713, 64242])
@pytest.mark.parametrize("n_bits", [8, 12])
def test_division_by_a_constant_is_exact_and_least(divisor, n_bits):
    """floor(n / q) = (n M) >> s for every n < 2^n_bits (all of them checked), and s is the least
    shift the proof's condition admits."""
    magic, shift = params.division_by_constant(divisor, n_bits)
    n = np.arange(1 << n_bits, dtype=object)
    assert all((n * magic) >> shift == n // divisor)
    if shift:
        fewer = -(-(1 << (shift - 1)) // divisor)
        assert (fewer * divisor - (1 << (shift - 1))) << n_bits > 1 << (shift - 1)


def test_the_exp_units_z_is_exact_on_its_whole_domain():
    """The softmax unit's z for the baseline's constants (m = 64): every -x_F the bound allows."""
    unit = params.softmax_params(1 << 20, 22, [10], 512, 8, "half_even", kernels.EXP_F, 64)
    q_ln2 = unit["Q_LN2"]
    n = np.arange(0, 1 << unit["Z_IN_W"], 997, dtype=object)
    assert all((n * unit["MAGIC"]) >> unit["MAGIC_S"] == n // q_ln2)
    assert (unit["Q_LN2"], unit["Q_B"]) == kernels.exp_constants(kernels.EXP_F, 64)[:2]


def test_layer_norm_widths_are_the_proven_bounds():
    d, bits, beta, eps_q = 512, 16, (1 << 40) - 3, 17
    unit = params.layer_norm_params(d, bits, 16, beta, eps_q, 16, "floor")
    bounds = kernels.layer_norm_bounds(d, bits, 1 << 15, beta, eps_q, 16)
    signed = accumulation.signed_bits
    assert unit["S_W"] == signed(bounds["s"]) and unit["C_W"] == signed(bounds["c"])
    assert unit["W_W"] == bounds["W"].bit_length() and unit["NUM_W"] == signed(bounds["numerator"])
    assert (1 << (unit["N_Q_W"] - 1)) <= bounds["n"] < 1 << unit["N_Q_W"]
    assert unit["Y_W"] == signed(bounds["y"]) and unit["ROUNDING"] == 0


def test_a_layer_norm_the_unit_cannot_shift_is_refused():
    """k + F < 0 (a divisor shifted instead of the numerator) is outside the unit: refused."""
    with pytest.raises(ValueError, match="k \\+ F"):
        params.layer_norm_params(4096, 16, 16, 1, 0, 16, "half_even", K=2, F=0)


def test_the_clamp_setting_never_changes_a_result():
    """max(x, clamp) = max(x, clamp_setting) for every x the X_W-bit port holds."""
    for clamp, bits in ((-(1 << 30), 20), (-(1 << 10), 20), (-1, 4)):
        setting = params.clamp_setting(clamp, bits)
        x = np.arange(-(1 << (bits - 1)), 1)
        assert np.array_equal(np.maximum(x, clamp), np.maximum(x, setting))
        assert setting >= -(1 << (bits - 1))


def test_the_command_refuses_a_folder_that_is_not_an_export(tmp_path):
    run = subprocess.run([sys.executable, "-m", "hw.params", "--export", str(tmp_path), "--out",
                          str(tmp_path / "p")], capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    expected = f"--export {tmp_path}: no manifest.json there (not an export folder)"
    assert run.stderr.strip().splitlines() == [expected]
