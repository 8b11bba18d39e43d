"""Moved to `edgeseg.targets` (the single record of a target); kept while callers move."""
from edgeseg.targets import TargetProfile, list_profiles, load_profile, parse_profile  # noqa: F401
