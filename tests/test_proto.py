"""The committed stubs in client/generated are exactly what proto/ generates."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = {path.name: path.read_bytes() for path in generate.generate(tmp_path)}
    committed = {path.name: path.read_bytes() for path in (ROOT / "client" / "generated").iterdir() if path.is_file()}
    assert fresh.keys() == committed.keys(), "run `make proto` and commit client/generated"
    for name, data in fresh.items():
        assert committed[name] == data, f"client/generated/{name} is stale: run `make proto` and commit it"
