"""Durations as written in the config: parse_duration and its (approximate) inverse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sweeperd.durations import MAX_SECONDS, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1ms", 0.001),
        ("0ms", 0.0),
        ("0s", 0.0),
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("90d", 90 * 86400.0),
        ("1w", 604800.0),
        ("2w", 2 * 604800.0),
        ("15min", 900.0),
        ("30sec", 30.0),
    ],
)
def test_single_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h30m", 5400.0),
        ("1d12h", 86400.0 + 43200.0),
        ("2m30s", 150.0),
        ("1s500ms", 1.5),
        ("1w1d1h1m1s1ms", 604800 + 86400 + 3600 + 60 + 1 + 0.001),
        ("1m1ms", 60.001),  # "m" followed by "ms": not confused
        ("1h30min", 5400.0),
        ("2min5sec", 125.0),
        ("1min1ms", 60.001),
    ],
)
def test_combinations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("  30s  ", 30.0),
        ("\t2h\n", 7200.0),
        ("1h 30m", 5400.0),
        (" 1h  30m  15s ", 5415.0),
    ],
)
def test_whitespace_is_ignored(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        ("2.5ms", 0.0025),
        ("1.25d", 1.25 * 86400.0),
        ("1h0.5m", 3630.0),
    ],
)
def test_fractional(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "30",  # bare number: seconds? minutes? units are required
        "0",
        "1.5",
        "1h30",  # trailing bare number
        "5x",  # unknown unit
        "5secs",
        "5mins",
        "5minutes",
        "5mi",
        "5 hours",
        "1y",
        "h",  # unit without a number
        "ms",
        "-5s",  # negative
        "-1h30m",
        "+5s",
        ".5s",
        "5.s",
        "1e3s",
        "1h-30m",
        "5S",  # units are lower case
        "1h,30m",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    message = str(info.value)
    assert "expected a duration" in message
    assert repr(text) in message  # names what it got


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.25, "250ms"),
        (0.5, "500ms"),
        (1.0, "1s"),
        (30.0, "30s"),
        (12.5, "12.5s"),
        (60.0, "1m"),
        (90.0, "1m30s"),
        (5400.0, "1h30m"),
        (7200.0, "2h"),
        (86400.0 + 3600.0 + 1.0, "1d1h1s"),
        (90 * 86400.0, "90d"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10 * 365 * 86400))
def test_format_then_parse_round_trips_whole_seconds(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@given(st.floats(min_value=0, max_value=10 * 86400, allow_nan=False, allow_infinity=False))
def test_format_then_parse_is_close_for_fractions(seconds: float) -> None:
    # Sub-second values keep milliseconds; under a minute three significant digits; above
    # a minute whole seconds.
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=0.01, abs=0.5)


# -- the range: what every consumer (datetimes, APScheduler, PostgreSQL) can hold ---------------


@pytest.mark.parametrize(
    "text", ["1" + "0" * 400 + "s", "99999999999999d", "36501d", "5300w", "1e3s"]
)
def test_beyond_the_maximum_or_infinite_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"at most 36500d|expected a duration such as"):
        parse_duration(text)


def test_the_maximum_itself_is_accepted() -> None:
    assert parse_duration("36500d") == MAX_SECONDS
    assert parse_duration("100w") == 100 * 604800.0
