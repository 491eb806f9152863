"""Shared test setup: the repo root on sys.path, and one cached tiny base model for the whole session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# One cache for the whole session (and across sessions on a machine), so the tiny base is built once.
os.environ.setdefault("REASONER_ZERO_CACHE", str(Path.home() / ".cache" / "reasoner-zero"))


@pytest.fixture(scope="session")
def tiny_base():
    """Directory of the built-in tiny base model (built on first use, about 2 minutes on 2 cores)."""
    from data.synthetic import build_tiny_base

    return build_tiny_base()
