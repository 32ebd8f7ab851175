"""Shared fixtures of the trainer tests: a few short synthetic clips, generated once per session."""
import pytest

from musetalk_fast.data import generate_clips


@pytest.fixture(scope="session")
def heldout_clips():
    """Two identities x one 3-second clip (ground truth in memory)."""
    return list(generate_clips(2, 1, 3.0, seed=21))
