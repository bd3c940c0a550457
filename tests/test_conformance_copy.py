"""tests/conformance is a faithful copy of the project's shared golden cases."""

import filecmp
from pathlib import Path

import pytest

from tests.conformance_cases import CONFORMANCE_DIR

SHARED = Path(__file__).resolve().parents[2] / "shared" / "conformance"


@pytest.mark.skipif(not SHARED.is_dir(), reason="no shared/ beside this checkout (a user's clone)")
def test_vendored_cases_equal_the_shared_ones() -> None:
    shared = sorted(p.name for p in SHARED.iterdir())
    assert sorted(p.name for p in CONFORMANCE_DIR.iterdir()) == shared
    match, mismatch, errors = filecmp.cmpfiles(SHARED, CONFORMANCE_DIR, shared, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
