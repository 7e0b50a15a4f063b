"""Checks of scalar arguments and hyper-parameters, shared by every layer (DESIGN.md rule 2).

    r = integer("r", r, low=1)                       # TypeError for 2.5, ValueError for 0
    p = number("dropout", p, low=0, high=1, high_open=True)
    mode = choice("loss_type", mode, ("sigmoid", "ipo"))
    eos = token_ids("eos_token_id", eos)             # an id or a list of them -> list[int]

Each returns the checked value and raises TypeError (the wrong kind of value) or ValueError (a
value out of range) whose message names the argument, says what was expected and shows what
came. Imports nothing of fusedlm. Tensor checks of the ops live in ``fusedlm.ops``.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """A Python integer (not a bool) in [low, high] (either bound may be None); returns it as an int."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        want = f"in [{low}, {high}]" if low is not None and high is not None else f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be {want}, got {value}")
    return int(value)


def positive_int(name: str, value) -> int:
    """A Python integer > 0; returns it as an int."""
    if _is_int(value) and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return integer(name, value)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"{'<' if high_open else '<='} {high}"


def number(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval from low to high (open at an end when
    low_open / high_open; either bound may be None); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def probability(name: str, value, *, low_open: bool = False, high_open: bool = False) -> float:
    """A number in [0, 1] (open at an end when low_open / high_open)."""
    return number(name, value, low=0, high=1, low_open=low_open, high_open=high_open)


def choice(name: str, value, choices):
    """One of `choices`; returns it."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def token_id(name: str, value) -> int:
    """One token id (an int >= 0); ValueError names the argument otherwise."""
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"{name} must be a token id (an int >= 0), got {value!r}")
    return int(value)


def token_ids(name: str, value, *, single: bool = False) -> list[int]:
    """Token ids (ints >= 0) as a list: a sequence or a tensor of them, or (single=True) also one
    id. ValueError names the argument otherwise (an id of the wrong kind is a wrong value)."""
    ids = value
    if single and _is_int(value):
        ids = [value]
    elif isinstance(value, torch.Tensor):
        ids = value.reshape(-1).tolist()
    elif not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        ids = list(value)
    if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
        what = "a token id (an int >= 0) or a list of them" if single else "a list of token ids (ints >= 0)"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return [int(i) for i in ids]


def per_row(name: str, value, batch: int, ok: Callable[[torch.Tensor], torch.Tensor], expected: str, *,
            integral: bool = False):
    """A scalar or a per-row tensor [batch] (an int / integer tensor when `integral`) whose values
    all satisfy ok(tensor) (an elementwise bool test); returns it."""
    if isinstance(value, torch.Tensor):
        if integral and value.is_floating_point():
            raise TypeError(f"{name} must be an int or an integer tensor, got {value!r}")
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a tensor of shape [{batch}] (one per prompt), got shape {list(value.shape)}")
        bad = ~ok(value)
    else:
        if integral and not _is_int(value):
            raise TypeError(f"{name} must be an int or an integer tensor, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
        bad = ~ok(torch.tensor(value))
    if bool(bad.any()):
        got = value if not isinstance(value, torch.Tensor) else value[bad][0].item()
        raise ValueError(f"{name} must be {expected}, got {got}")
    return value
