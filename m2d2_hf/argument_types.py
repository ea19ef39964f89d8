"""argparse value types shared by the command-line sub-commands (the CLI and the search commands)."""

import argparse
import math
from collections.abc import Callable
from typing import TypeVar


Number = TypeVar("Number", int, float)


def _checked(text: str, convert: Callable[[str], Number], accept: Callable[[Number], bool], expected: str) -> Number:
    """`convert(text)` when it parses and `accept`s; else argparse's error naming what was `expected`."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _checked(text, int, lambda value: value >= 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer of at least 0."""
    return _checked(text, int, lambda value: value >= 0, "a whole number of 0 or more")


def positive_seconds(text: str) -> float:
    """A finite duration above zero, in seconds."""
    return _checked(
        text, float, lambda value: math.isfinite(value) and value > 0, "a positive, finite number of seconds"
    )


def cosine_threshold(text: str) -> float:
    """A cosine similarity in (0, 1]."""
    return _checked(text, float, lambda value: 0 < value <= 1, "a cosine threshold in (0, 1], e.g. 0.95")
