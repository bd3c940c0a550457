"""The framework examples run: 2 worker processes train on digits in sync and async mode, and print the accuracy."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script,needs", [
    ("torch_digits.py", ["torch"]),
    ("jax_digits.py", ["flax", "optax"]),
    ("keras_digits.py", ["keras"]),
    ("keras_digits.py --backend tensorflow", ["keras", "tensorflow"]),
])
def test_example_trains_two_workers_in_both_modes(script: str, needs: list[str]) -> None:
    missing = [module for module in needs if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{script} needs {missing} (the torch, jax, keras or tensorflow extra)")
    script, *options = script.split()
    run = subprocess.run([sys.executable, str(EXAMPLES / script), *options, "--steps", "60", "--workers", "2"],
                         capture_output=True, text=True, timeout=600, cwd=EXAMPLES.parent)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    for mode, steps in (("sync", 60), ("async", 120)):
        match = re.search(rf"^\[{mode}\] held-out accuracy (\d\.\d+) after (\d+) steps of 2 workers$", run.stdout,
                          re.MULTILINE)
        assert match, run.stdout
        accuracy, taken = float(match.group(1)), int(match.group(2))
        assert accuracy > 0.75, run.stdout  # 10 classes: chance is 0.1
        # async: the JAX worker drops a push refused as too stale
        assert taken == steps if mode == "sync" else steps // 2 <= taken <= steps, run.stdout
