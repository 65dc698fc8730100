"""THE Slurm time-limit parser/formatter."""

from __future__ import annotations

import pytest

from aimass_hpc.common.timelimit import (
    TimeLimitError,
    format_elapsed,
    format_time,
    parse_elapsed,
    parse_time,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5", 300),
        ("90", 5400),
        ("5:30", 330),
        ("1:00:00", 3600),
        ("36:00:00", 129600),
        ("1-0", 86400),
        ("2-12", 216000),
        ("1-02:03", 93780),
        ("1-02:03:04", 93784),
        (10, 600),
        ("UNLIMITED", None),
        ("infinite", None),
        ("0:00", 0),
    ],
)
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "1:75", "1-25", "-5", "1:2:3:4", "1.5", "1-2-3"])
def test_parse_time_rejects(text):
    with pytest.raises(TimeLimitError):
        parse_time(text)


def test_unlimited_can_be_refused():
    with pytest.raises(TimeLimitError):
        parse_time("UNLIMITED", allow_unlimited=False)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "00:00:00"),
        (59, "00:00:59"),
        (3600, "01:00:00"),
        (93784, "1-02:03:04"),
        (None, "UNLIMITED"),
    ],
)
def test_format_time_round_trips(seconds, text):
    assert format_time(seconds) == text
    assert parse_time(text) == seconds


def test_elapsed_columns():
    assert parse_elapsed("0:05") == 5
    assert parse_elapsed("1-00:00:01") == 86401
    assert parse_elapsed("INVALID") is None and parse_elapsed("") is None
    assert [format_elapsed(s) for s in (None, 5, 65, 3660, 90000)] == [
        "-",
        "5s",
        "1m05s",
        "1h01m",
        "1d01h",
    ]
