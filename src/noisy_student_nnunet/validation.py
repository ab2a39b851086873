"""Argument checks shared by the commands, run before any work starts.

Each returns the checked value or raises :class:`NsnError` naming the option, the allowed range and
the value given, so that a bad option costs a second, not a teacher ensemble run.
"""

from __future__ import annotations

import math
from typing import Sequence

from noisy_student_nnunet.errors import NsnError


def number_in(value: float, option: str, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> float:
    """``low <= value <= high`` (an end is excluded where ``*_open``); NaN is refused."""
    lo_ok = value > low if low_open else value >= low
    hi_ok = value < high if high_open else value <= high
    if math.isnan(value) or not (lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise NsnError(f"{option} must be in {interval}, got {value:g}")
    return value


def positive(value: float, option: str) -> float:
    """A finite number above 0."""
    if not (math.isfinite(value) and value > 0):
        raise NsnError(f"{option} must be a positive number, got {value:g}")
    return value


def at_least(value: int, option: str, minimum: int, meaning: str = "") -> int:
    """A whole number ``>= minimum``; ``meaning`` says what the option counts, for the message."""
    if value < minimum:
        raise NsnError(f"{option} must be at least {minimum}{f' ({meaning})' if meaning else ''}, got {value}")
    return value


def parts(num_parts: int, part_id: int, num_parts_option: str, part_id_option: str) -> None:
    """nnU-Net's sharding options: ``num_parts >= 1`` first (so 0 is not answered with an empty range), then
    ``0 <= part_id < num_parts``."""
    at_least(num_parts, num_parts_option, 1, "the number of processes sharing the cases")
    if not 0 <= part_id < num_parts:
        raise NsnError(f"{part_id_option} {part_id}: must be in 0 .. {num_parts - 1} for {num_parts_option} "
                       f"{num_parts} (counted from 0)")


def parse_folds(folds: Sequence[int | str], option: str = "-f") -> list[int | str]:
    """nnU-Net's fold arguments: whole numbers >= 0 or 'all'; duplicates are an error."""
    parsed: list[int | str] = []
    for fold in folds:
        text = str(fold).strip()
        if text == "all":
            parsed.append("all")
        elif text.isdigit():
            parsed.append(int(text))
        else:
            raise NsnError(f"{option}: a fold is a whole number (0, 1, ...) or 'all', got {text!r}")
    if len(set(parsed)) != len(parsed):
        raise NsnError(f"{option}: duplicate folds in {' '.join(str(f) for f in folds)}")
    if not parsed:
        raise NsnError(f"{option}: no folds given")
    return parsed
