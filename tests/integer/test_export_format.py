"""Tests of integer/export_format.py's `$readmemh` files: round trip and line format (hypothesis),
range checks, known two's-complement words, 64-bit accumulators, comments, error messages.

NumPy only (no TensorFlow import here, directly or through the modules imported)."""

from __future__ import annotations

import numpy as np
import pytest
from exact import FAST, ref_mem_word, ref_range
from hypothesis import given
from hypothesis import strategies as st

from integer import export_format, fixed_point


def test_error_messages_name_what_is_wrong(tmp_path):
    assert fixed_point.int_dtype(8) == np.int8  # signed unless told otherwise
    with pytest.raises(ValueError, match="^no integer type holds 65 bits$"):
        fixed_point.int_dtype(65)
    with pytest.raises(ValueError, match=r"v.mem: values outside the 4-bit range \[-8, 7\]$"):
        export_format.write_mem(str(tmp_path / "v.mem"), np.array([8]), 4, True)
    with pytest.raises(ValueError, match="^unknown rounding 'nearest'$"):
        fixed_point.Grid(8, True, np.array(0)).quantize(np.zeros(2), "nearest")


def test_mem_comments_end_a_line_at_their_first_slashes(tmp_path):
    path = tmp_path / "c.mem"
    path.write_text("// header // more\n7f // 127 // max\n\n  80\n")
    assert export_format.read_mem(str(path), 8, True).tolist() == [127, -128]


# ============================================================================================
# $readmemh files
# ============================================================================================


@st.composite
def mem_cases(draw, max_bits=60):  # 61..64 bits: test_mem_file_of_64_bit_accumulators
    bits, signed = draw(st.integers(2, max_bits)), draw(st.booleans())
    n, p = ref_range(bits, signed)
    value = st.one_of(st.sampled_from(sorted({n, p, 0, min(max(-1, n), p), n + 1, p - 1})),
                      st.integers(n, p))
    return bits, signed, draw(st.lists(value, max_size=30)), draw(st.sampled_from(["", "a comment"]))


@FAST
@given(case=mem_cases())
def test_mem_file_round_trip_and_format(case, tmp_path_factory):
    """write_mem then read_mem gives the values back; each line is ceil(bits/4) hex digits of the
    two's complement, sign-extended; the optional first line is a // comment."""
    bits, signed, values, comment = case
    path = str(tmp_path_factory.mktemp("mem") / "v.mem")
    export_format.write_mem(path, np.array(values, np.int64), bits, signed, comment)
    lines = open(path).read().splitlines()
    if comment:
        assert lines.pop(0) == f"// {comment}"
    assert all(len(line) == -(-bits // 4) for line in lines)
    assert lines == [ref_mem_word(v, bits) for v in values]
    back = export_format.read_mem(path, bits, signed)
    assert back.dtype == np.int64 and back.tolist() == values


@FAST
@given(case=mem_cases(), data=st.data())
def test_mem_file_rejects_values_out_of_range(case, data, tmp_path_factory):
    bits, signed, values, _ = case
    n, p = ref_range(bits, signed)
    bad = data.draw(st.sampled_from([n - 1, p + 1]))
    position = data.draw(st.integers(0, len(values)))
    path = str(tmp_path_factory.mktemp("mem") / "bad.mem")
    with pytest.raises(ValueError):
        export_format.write_mem(path, np.array(values[:position] + [bad] + values[position:], np.int64),
                           bits, signed)


@pytest.mark.parametrize("value,bits,signed,word", [
    (-1, 8, True, "ff"), (-128, 8, True, "80"), (127, 8, True, "7f"), (255, 8, False, "ff"),
    (-8, 4, True, "8"), (7, 4, True, "7"), (-1, 6, True, "ff"), (-32, 6, True, "e0"),
    (31, 6, True, "1f"), (63, 6, False, "3f"), (-1, 12, True, "fff"), (-16, 5, True, "f0"),
    (-(2**31), 32, True, "80000000"), (2**31 - 1, 32, True, "7fffffff"), (0, 3, True, "0"),
])
def test_mem_words_of_known_values(tmp_path, value, bits, signed, word):
    assert ref_mem_word(value, bits) == word
    path = str(tmp_path / "v.mem")
    export_format.write_mem(path, np.array([value]), bits, signed)
    assert open(path).read() == word + "\n"
    assert export_format.read_mem(path, bits, signed).tolist() == [value]


def test_mem_file_of_64_bit_accumulators(tmp_path):
    path = str(tmp_path / "acc.mem")
    values = [-1, -(2**63), 2**63 - 1, 5]
    export_format.write_mem(path, np.array(values, np.int64), 64, True)
    assert open(path).read().split() == [ref_mem_word(v, 64) for v in values]
    assert export_format.read_mem(path, 64, True).tolist() == values
