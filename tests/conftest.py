"""Shared fixtures: the real data beside the repo (../shared), found relative to this file or $EDGESEG_SHARED."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGESEG_SHARED", REPO.parent / "shared"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    p = SHARED / "data" / "camvid"
    if not p.is_dir():
        pytest.skip(f"CamVid not present at {p}")
    return p


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    p = SHARED / "parity"
    if not p.is_dir():
        pytest.skip(f"parity references not present at {p}")
    return p
