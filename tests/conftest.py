from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


def parity_tolerance(expected) -> float:
    """The released-parity bar: 1e-4 absolute + 1e-4 relative to the largest expected magnitude."""
    import numpy as np

    return 1e-4 + 1e-4 * float(np.abs(expected).max())
