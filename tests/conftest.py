from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The reference material beside the checkout (../shared); tests that need it skip without it."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"reference material not found at {SHARED} (../shared beside the checkout)")
    return SHARED
