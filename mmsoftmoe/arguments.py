"""Range checks for command-line arguments, with the contract of the run config's keys: one `ValueError` naming
the flag, its valid range and the value given (which `mmsoftmoe` prints as one `error:` line, exit status 2)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def check_minimum(flag: str, value: float | None, minimum: float, *, strict: bool = False) -> None:
    """Refuse `value` below `minimum` (or equal to it when `strict`); NaN is refused too (no comparison holds)."""
    if value is None:
        return
    ok = value > minimum if strict else value >= minimum
    if not ok:
        raise ValueError(f"{flag} must be {'>' if strict else '>='} {minimum:g}, got {value}")


def check_arguments(args: argparse.Namespace, minimums: Mapping[str, tuple[float, bool]]) -> None:
    """`check_minimum` for each flag (`--batch-size` reads `args.batch_size`) -> (minimum, strict)."""
    for flag, (minimum, strict) in minimums.items():
        check_minimum(flag, getattr(args, flag.lstrip("-").replace("-", "_")), minimum, strict=strict)
