"""What the `python -m jaxdistill.X` command lines share: argparse with each option's default in `--help`,
seed and number checks."""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Sequence


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, with an option's default after its help (or as its help) where there is one to say (not
    None, False or empty) and the help does not say it already."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _says_something(action):  # argparse shows nothing for an option without help
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text + " (default: %(default)s)" if _says_something(action) and "default" not in text else text


def _says_something(action: argparse.Action) -> bool:
    default = action.default  # by identity: 0 == False, and a default of 0 is worth saying
    return (bool(action.option_strings) and all(default is not v for v in (None, False, argparse.SUPPRESS))
            and default not in ("", []))


def parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of `python -m jaxdistill.COMMAND`."""
    return argparse.ArgumentParser(prog=f"python -m jaxdistill.{command}", description=description,
                                   formatter_class=HelpFormatter)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as ints; ValueError for one outside 0 … 2**32 − 1 (`jax.random.key` keeps 32 bits without
    jax_enable_x64: seeds 0 and 2**32 would give the same noise)."""
    seeds = [int(s) for s in seeds]
    bad = [s for s in seeds if not 0 <= s < 2 ** 32]
    if bad:
        raise ValueError(f"seed {bad[0]}: seeds are integers in 0 … 2**32 − 1")
    return seeds


def seed(text: str) -> int:
    """argparse type of one seed, checked by `check_seeds`."""
    try:
        return check_seeds([int(text)])[0]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer in 0 … 2**32 − 1") from None


def number(low: float, high: float | None = None):
    """argparse type of a finite float in [low, high] (NaN and inf are refused: `float("nan")` parses)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
            bound = f"≥ {low:g}" if high is None else f"in {low:g} … {high:g}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number {bound}")
        return value
    return parse
