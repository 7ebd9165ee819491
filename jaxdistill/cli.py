"""What the `python -m jaxdistill.X` command lines share: argparse with each option's default in `--help`,
seed and number checks, a line instead of a traceback on SIGTERM and when the device's memory runs out."""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import math
import os
import signal
import sys
from collections.abc import Iterator, Sequence


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


class _Parser(argparse.ArgumentParser):
    """argparse's, naming the option a misspelt one probably meant (`--pipline`: did you mean --pipeline?)."""

    given: list[str] = []

    def parse_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        # also where the misspelt option is a required one: argparse then says only that it is missing
        options = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
        for word in (w.split("=")[0] for w in self.given if w.startswith("--")):
            close = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
            if word not in options and close:
                message += f" ({word}: did you mean {close[0]}?)"
                break
        super().error(message)


def parser(command: str, description: str | None) -> argparse.ArgumentParser:
    """The argument parser of `python -m jaxdistill.COMMAND`."""
    return _Parser(prog=f"python -m jaxdistill.{command}", description=description, formatter_class=HelpFormatter)


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


@contextlib.contextmanager
def stop_on_sigterm(says: str) -> Iterator[None]:
    """Inside the block SIGTERM (a scheduler's time limit, `kill`) ends the process at once, as its default
    action does, with a line that `says` what was kept instead of no word. For work whose files are each
    written whole."""
    def stop(signum, _frame):
        print(f"\n{signal.Signals(signum).name}: {says}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)  # no interpreter exit: background writer threads would each print a traceback

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def out_of_memory(error: BaseException) -> str | None:
    """XLA's first line, without its tags, when `error` is running out of device memory (RESOURCE_EXHAUSTED, at
    compiling or running), else None."""
    import jax

    if isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
        return str(error).split("\n")[0].split(" [")[0]
    return None


def more_gpu_memory(backend: str) -> str | None:
    """On a GPU where JAX may take less than 97 % of it (75 % by default): how to give it more. The full SSD-1B
    training step at micro-batches of 8 needs 67 GB of an 80 GB H100 (bench/NOTES.md)."""
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    if backend == "gpu" and fraction < 0.97:
        return f"more of each GPU for JAX (it takes {fraction:.0%}: XLA_PYTHON_CLIENT_MEM_FRACTION=0.97)"
    return None


@contextlib.contextmanager
def stop_when_out_of_memory(what: str, ways: Sequence[str]) -> Iterator[None]:
    """Inside the block, running out of device memory ends the command (exit status 1) with one line: `what`
    did not fit, the `ways` to make it fit (and more of the GPU, where that helps), XLA's words."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        xla = out_of_memory(e)
        if xla is None:
            raise
        ways = [*ways, *filter(None, [more_gpu_memory(jax.default_backend())])] or ["a smaller size"]
        print(f"error: {what} does not fit the device's memory; try {'; or '.join(ways)}. (XLA: {xla})",
              file=sys.stderr)
        raise SystemExit(1) from None
