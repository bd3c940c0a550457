"""tests/conformance and tests/conformance_optimizers are faithful copies of the project's shared golden cases."""

import filecmp
from pathlib import Path

import pytest

from tests.conformance_cases import CONFORMANCE_DIR, FAMILY_DIR

SHARED_ROOT = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.parametrize("vendored, shared_name", [(CONFORMANCE_DIR, "conformance"),
                                                   (FAMILY_DIR, "conformance-optimizers")])
def test_vendored_cases_equal_the_shared_ones(vendored: Path, shared_name: str) -> None:
    shared_dir = SHARED_ROOT / shared_name
    if not shared_dir.is_dir():
        pytest.skip("no shared/ beside this checkout (a user's clone)")
    shared = sorted(p.name for p in shared_dir.iterdir())
    assert sorted(p.name for p in vendored.iterdir()) == shared
    match, mismatch, errors = filecmp.cmpfiles(shared_dir, vendored, shared, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
