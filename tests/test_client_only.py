"""The client works without JAX: a fresh `pip install .` venv talks to a real server."""

import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import importlib.util
import numpy as np
from optserve.client import Client, IndexedSlices
assert importlib.util.find_spec("jax") is None, "jax is installed in the client-only venv"
client = Client(sys.argv[1], timeout=60)
opt = client.optimizer(sys.argv[2])
version = opt.push({"w": np.full(4, 0.5), "emb": IndexedSlices([0, 2, 0], np.ones((3, 2), np.float32))})
weights = opt.pull()
assert weights.version == version == 1, (weights.version, version)
assert np.allclose(weights["w"], -0.1, rtol=1e-4), weights["w"]  # one Adam step of lr 0.1
assert "jax" not in sys.modules
print("client-only ok", weights["w"].tolist())
assert importlib.util.find_spec("ml_dtypes") is None  # so bfloat16 goes the client's own way
assert opt.push({"w": np.full(4, 0.5), "emb": np.ones((3, 2))}, wire_dtype="bfloat16") == 2
"""


def test_client_only_install_needs_no_jax(client, name, tmp_path: Path) -> None:
    source = tmp_path / "source"  # only what the distribution is built from
    source.mkdir()
    for part in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / part, source / part)
    for part in ["client", "wire", "server", "frameworks"]:
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = tmp_path / "client-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr[-3000:]

    opt = client.create_optimizer(name, {"w": np.zeros(4, np.float32), "emb": np.zeros((3, 2), np.float32)},
                                  {"learning_rate": 0.1})
    run = subprocess.run([python, "-c", SCRIPT, client.address, name], capture_output=True, text=True,
                         timeout=120, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "client-only ok" in run.stdout
    assert opt.info().version == 2
    client.delete_optimizer(name)
