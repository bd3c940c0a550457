"""Runs tests/tensorflow_cases.py in one subprocess on Keras's TensorFlow backend (the suite's Keras is on JAX)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = 11  # tests/tensorflow_cases.py's test cases: all must pass, none skip


def test_tensorflow_backend_and_tf_keras_cases_pass() -> None:
    missing = [module for module in ("tensorflow", "tf_keras") if importlib.util.find_spec(module) is None]
    if missing:
        pytest.skip(f"{missing} not installed (the tensorflow extra, then pip install --no-deps tf-keras)")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/tensorflow_cases.py", "-q", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-3000:]
    assert re.search(rf"^{CASES} passed", run.stdout, re.MULTILINE), run.stdout[-3000:]
