"""Each target's int8 scheme as its exporter applies it on this host (ranges, symmetry, 7-bit weights where the CPU
needs them), for the sensitivity simulation (`edgeseg quant-report --target`, the mIoU budget's ranking).

The scheme itself comes from the target's exporter (`Exporter.int8_scheme`, the hook each exporter implements);
this module only resolves the target's profile and options and refuses what cannot be simulated.
"""
from __future__ import annotations

from typing import Any

from edgeseg.quant.sensitivity import Int8Scheme


def scheme_for_target(target: str, options: dict[str, Any] | None = None) -> Int8Scheme:
    """The int8 scheme `target`'s exporter uses with its profile options (overridden by `options`), resolved as
    the exporter resolves them on this host ("auto" reduce_range / overflow fix from this CPU's flags).

    Raises:
        UsageError (one line) for an unknown target, an int8-less target, or a scheme this simulation cannot
        reproduce (a calibration method other than MinMax, or an exporter without an int8 scheme hook).
    """
    from edgeseg.errors import UsageError

    scheme = _exporter_scheme(target, options)
    if scheme is None:
        raise UsageError(f"--target {target}: its int8 scheme cannot be simulated; simulated targets: "
                         f"{', '.join(simulated_targets()) or 'none'}")
    return scheme


def simulated_targets() -> list[str]:
    """The targets (profiles) whose exporters give an int8 scheme with their profile options."""
    from edgeseg.errors import UsageError
    from edgeseg.targets import list_profiles

    names = []
    for name in list_profiles():
        try:
            if _exporter_scheme(name, None) is not None:
                names.append(name)
        except UsageError:
            continue
    return names


def _exporter_scheme(target: str, options: dict[str, Any] | None) -> Int8Scheme | None:
    """The exporter's `int8_scheme` for `target` with its resolved options; None where the exporter has none."""
    from edgeseg.errors import UsageError
    from edgeseg.export import get_exporter
    from edgeseg.export.profiles import load_profile

    exporter = get_exporter(target)  # UsageError naming the known targets
    profile = load_profile(target)
    if "int8" not in profile.precisions:
        raise UsageError(f"--target {target}: has no int8 precision ({', '.join(profile.precisions)})")
    opts = exporter.Options.from_dict({**profile.io_options(), **profile.options, **(options or {})},
                                      where="options")
    calib = getattr(opts, "calibrate_method", "MinMax")
    if calib != "MinMax":
        raise UsageError(f"--target {target}: calibrate_method {calib!r} cannot be simulated (quant-report "
                         "simulates MinMax ranges only)")
    return exporter.int8_scheme(target, opts)
