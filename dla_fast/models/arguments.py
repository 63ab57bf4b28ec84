"""Checks of the models' constructor arguments: a ValueError naming the argument and the values it may take.

Integers must be real ints (numpy ints too): a bool or a float such as 1.5 is refused rather than truncated,
and booleans must be bools, so that `features_only="no"` does not silently mean True.
"""
from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int) -> int:
    """`value` as a Python int if it is an integer >= `minimum`; ValueError naming `name` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    """`value` if it is a bool; ValueError naming `name` otherwise."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r} ({type(value).__name__})")
    return value


def check_choice(name: str, value, choices: tuple) -> int:
    """`value` if it is one of the ints `choices` (not a bool or float equal to one); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}; got {value!r}")
    return int(value)
