"""What the cmfast-* commands share (cli/_common): the argument type `ranged` at the ends of its ranges, and an error
as its first line. A mutation study of the CLIs found the open lower end, the upper end and the first line unchecked
(each test was seen failing with the mutation it names)."""
import argparse

import pytest

from cmfast.cli import _common


def test_ranged_takes_its_ends_and_refuses_what_is_past_them():
    """[lo, hi] takes lo and hi; (lo, hi] refuses lo itself (--lr 0 of cmfast-train) and takes what is just above."""
    assert _common.ranged(int, 1)("1") == 1
    assert _common.ranged(int, 0, 5)("5") == 5
    assert _common.ranged(float, 0, lo_open=True)("1e-9") == 1e-9
    for kind, lo, hi, lo_open, s, rng in ((int, 1, None, False, "0", "[1, inf]"), (int, 0, 5, False, "6", "[0, 5]"),
                                          (float, 0, None, True, "0", "(0, inf]"),
                                          (float, 0.0, 1.0, True, "1.5", "(0.0, 1.0]")):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            _common.ranged(kind, lo, hi, lo_open)(s)
        assert str(e.value) == f"expected a value in {rng}, got {s}"


def test_an_error_is_reported_by_its_first_line():
    """first_line: a message of several lines is its first (the one-line error rule), an empty one its type's name."""
    assert _common.first_line(ValueError("bad value\n  detail\nmore")) == "bad value"
    assert _common.first_line(KeyError()) == "KeyError"


def test_sigmas_take_numbers_only_between_their_commas():
    """--sigmas: comma-separated numbers, a tuple of floats; an empty place (80, or 80,,2) is refused, not skipped."""
    parse = _common.sigmas_type("80,0.821")
    assert parse("80,0.821") == (80.0, 0.821)
    for s in ("80,", "80,,2"):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            parse(s)
        assert str(e.value) == f"expected comma-separated numbers like 80,0.821, got {s!r}"
