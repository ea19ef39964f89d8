"""Shared test fixtures: the `../shared` folder beside the repository, the original runtime's reference outputs."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("M2D2_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURE_DIR = SHARED_DIR / "fixtures" / "original_m2d2"
REAL_SOUNDS_DIR = SHARED_DIR / "data" / "real_sounds"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: these tests need the project's shared/ folder beside the repository")
    return path


@pytest.fixture(scope="session")
def reference() -> dict:
    """Arrays the original NTT runtime produced on the seed-0 fixture checkpoint."""
    with np.load(_require(FIXTURE_DIR / "reference_synthetic.npz")) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def real_sounds_dir() -> Path:
    return _require(REAL_SOUNDS_DIR)
