"""Parsers for command-line values shared by several commands (one place, so they agree on syntax and errors)."""
from __future__ import annotations

from edgeseg.errors import UsageError


def parse_hw(text: str | None, flag: str, *, multiple_of: int) -> tuple[int, int] | None:
    """'HxW' (also 'H*W', 'H×W', or a single N for NxN) -> (H, W); None for None.

    UsageError (one line naming `flag`) for anything but two positive integers, or for a side that is not a
    multiple of `multiple_of` (1: any size; 32: what evaluation at a model's input size needs).
    """
    if text is None:
        return None
    parts = text.lower().replace("×", "x").replace("*", "x").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) <= 0:
        raise UsageError(f"{flag} {text!r}: expected HxW with positive integers, e.g. 352x480")
    if vals[0] % multiple_of or vals[1] % multiple_of:
        raise UsageError(f"{flag} {text}: height and width must be multiples of {multiple_of} (e.g. 352x480)")
    return vals[0], vals[1]
