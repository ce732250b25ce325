"""The one validation module: what counts as an integer, a real, a ratio and a bit-width."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optuna_ctpe._validation import check_bits
from optuna_ctpe._validation import check_grid
from optuna_ctpe._validation import check_integer
from optuna_ctpe._validation import check_ratio
from optuna_ctpe._validation import check_real
from optuna_ctpe._validation import is_integer
from optuna_ctpe._validation import is_real


@pytest.mark.parametrize("value", [0, 7, -3, np.int64(2), np.int8(1), np.uint16(4)])
def test_python_and_numpy_integers_are_integers(value) -> None:
    assert is_integer(value)
    assert type(check_integer(value, "n")) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, "2", None, np.float64(2)])
def test_booleans_floats_and_text_are_not_integers(value) -> None:
    assert not is_integer(value)
    with pytest.raises(ValueError, match=r"^n must be an integer, got "):
        check_integer(value, "n")


@pytest.mark.parametrize(
    ("minimum", "maximum", "requirement"),
    [
        (0, None, "a non-negative integer"),
        (1, None, "a positive integer"),
        (2, None, "an integer >= 2"),
        (None, 5, "an integer <= 5"),
        (2, 16, r"an integer in \[2, 16\]"),
    ],
)
def test_integer_bounds_are_named_in_the_message(minimum, maximum, requirement) -> None:
    bad = (minimum - 1) if minimum is not None else maximum + 1
    with pytest.raises(ValueError, match=f"^seed must be {requirement}, got {bad}\\.$"):
        check_integer(bad, "seed", minimum=minimum, maximum=maximum)
    good = minimum if minimum is not None else maximum
    assert check_integer(good, "seed", minimum=minimum, maximum=maximum) == good


def test_integer_message_takes_an_extra_requirement() -> None:
    with pytest.raises(ValueError, match="round_to must be a positive integer or None, got 0"):
        check_integer(0, "round_to", minimum=1, extra="or None")


@pytest.mark.parametrize("value", [1.5, 0, np.float32(0.25), np.int64(3)])
def test_reals_are_returned_as_floats(value) -> None:
    assert is_real(value)
    result = check_real(value, "x")
    assert type(result) is float and result == float(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, 1j])
def test_non_finite_and_non_real_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match="^x must be a finite number, got "):
        check_real(value, "x")


def test_real_bounds_open_and_closed() -> None:
    assert check_real(0.0, "t", minimum=0.0) == 0.0
    with pytest.raises(ValueError, match="t must be a number > 0, got 0"):
        check_real(0, "t", minimum=0.0, open_minimum=True)
    with pytest.raises(ValueError, match="t must be a finite non-negative number, got -1"):
        check_real(-1, "t", minimum=0.0)
    with pytest.raises(ValueError, match=r"floor must be a number in \[0, 1\], got 1.5"):
        check_real(1.5, "floor", minimum=0.0, maximum=1.0)


@pytest.mark.parametrize("value", [1, 0.5, 1e-9, np.float64(0.75)])
def test_ratios_in_the_half_open_unit_interval(value) -> None:
    assert check_ratio(value, "width") == float(value)


@pytest.mark.parametrize("value", [0, -0.1, 1.0001, math.nan, True])
def test_ratios_outside_it_are_refused(value) -> None:
    with pytest.raises(ValueError, match=r"width must be a number in \(0, 1\], got "):
        check_ratio(value, "width")


def test_bit_widths_from_two_to_a_maximum() -> None:
    assert check_bits(np.int64(2), "bits") == 2
    assert check_bits(16, "bits") == 16
    assert check_bits(32, "activation_bits", maximum=32) == 32
    for bad in (1, 17, 4.0, True):
        with pytest.raises(ValueError, match=r"bits must be an integer bit-width in \[2, 16\]"):
            check_bits(bad, "bits")


def test_grids_are_sorted_checked_and_free_of_repeats() -> None:
    assert check_grid([8, np.int64(2), 4], "bits", check_bits) == (2, 4, 8)
    assert check_grid((1.0, 0.5), "widths", check_ratio) == (0.5, 1.0)
    for bad in ([], "248", {2: 1}, 8):
        with pytest.raises(ValueError, match="bits must be a non-empty sequence"):
            check_grid(bad, "bits", check_bits)
    with pytest.raises(ValueError, match="bits must not repeat a value"):
        check_grid([2, 2], "bits", check_bits)
    with pytest.raises(ValueError, match="bit-width"):
        check_grid([2, 1], "bits", check_bits)
