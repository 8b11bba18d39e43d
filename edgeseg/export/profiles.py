"""A target's profile (edgeseg.targets) checked against its exporter: the precisions it can produce and the
options its `Options` dataclass takes. Export uses these checked loaders; everything else reads edgeseg.targets.
"""
from __future__ import annotations

from typing import Any

from edgeseg.errors import UsageError
from edgeseg.targets import TargetProfile, exporter_module, list_profiles  # noqa: F401  (list_profiles: re-exported)
from edgeseg.targets import load_profile as _load_record
from edgeseg.targets import parse_profile as _parse_record


def exporter_class(profile: TargetProfile):
    """The exporter module's `EXPORTER` class (imports the light module, not the vendor tool)."""
    return exporter_module(profile.exporter).EXPORTER


def check_profile(profile: TargetProfile) -> TargetProfile:
    """UsageError naming the key when the profile asks its exporter for a precision or option it lacks."""
    cls = exporter_class(profile)
    unsupported = [p for p in profile.precisions if p not in cls.precisions]
    if unsupported:
        raise UsageError(f"{profile.source}: precisions: exporter {profile.exporter!r} cannot produce {unsupported}")
    cls.Options.from_dict({**profile.io_options(), **profile.options}, where=f"{profile.source}: options")
    return profile


def load_profile(name: str) -> TargetProfile:
    """`edgeseg.targets.load_profile`, then checked against the exporter."""
    return check_profile(_load_record(name))


def parse_profile(data: dict[str, Any], stem: str, where: str) -> TargetProfile:
    """`edgeseg.targets.parse_profile`, then checked against the exporter."""
    return check_profile(_parse_record(data, stem, where))
