"""Parsers for command-line values shared by several commands (one place, so they agree on syntax and errors)."""
from __future__ import annotations

from edgeseg.errors import UsageError


# The largest side a size may have: the models' attention and activations grow with the input (at 4096x4096 a
# forward pass of the shipped model already takes several GB), and larger images are resized to the input size.
MAX_SIDE = 4096


def parse_hw(text: str | None, flag: str, *, multiple_of: int, max_side: int | None = MAX_SIDE
             ) -> tuple[int, int] | None:
    """'HxW' (also 'H*W', 'H×W', or a single N for NxN) -> (H, W); None for None.

    UsageError (one line naming `flag`) for anything but two positive integers, for a side that is not a
    multiple of `multiple_of` (1: any size; 32: what evaluation at a model's input size needs), or for a side
    above `max_side` (None: no limit).
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
    if max_side is not None and max(vals) > max_side:
        raise UsageError(f"{flag} {text}: at most {max_side} per side (the models' memory grows with the input "
                         "size; images of any size are resized to it)")
    if vals[0] % multiple_of or vals[1] % multiple_of:
        raise UsageError(f"{flag} {text}: height and width must be multiples of {multiple_of} (e.g. 352x480)")
    return vals[0], vals[1]
