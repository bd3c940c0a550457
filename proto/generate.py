"""Generates the Python stubs for proto/optserve/v1 into a folder.

`make proto` writes them to client/generated (the package `optserve.v1`);
tests/test_proto.py writes them to a temporary folder and checks that the
committed copy is byte-for-byte the same. Needs grpcio-tools (a test extra).
"""

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = sorted(PROTO_ROOT.glob("optserve/v1/*.proto"))
HEADER = '"""Generated from proto/optserve/v1 by `make proto`; do not edit."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs (and the package's __init__.py) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + [str(p) for p in SOURCES]) != 0:
            raise RuntimeError("protoc failed")
        written = []
        for path in sorted((Path(tmp) / "optserve" / "v1").iterdir()):
            written.append(Path(shutil.copy(path, out_dir / path.name)))
    init = out_dir / "__init__.py"
    init.write_text(HEADER)
    return [init] + written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1])):
        print(path)
