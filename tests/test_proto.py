"""The committed stubs in client/generated are exactly what proto/ generates."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    # In a fresh interpreter: grpc_tools' protoc crashes (SIGSEGV) in a process that has loaded TensorFlow, as the
    # suite has once the tensorflow extra is installed (keras.utils.set_random_seed imports it).
    run = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = {Path(line).name: Path(line).read_bytes() for line in run.stdout.split()}
    committed = {path.name: path.read_bytes() for path in (ROOT / "client" / "generated").iterdir() if path.is_file()}
    assert fresh.keys() == committed.keys(), "run `make proto` and commit client/generated"
    for name, data in fresh.items():
        assert committed[name] == data, f"client/generated/{name} is stale: run `make proto` and commit it"
