"""`optserve bench --quick` runs end to end (a smoke test: timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path


def test_quick_bench_reports_every_durability_mode(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "bench", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads(out.read_text())
    assert set(results["durability"]) == {"memory", "wal", "none"}
    assert all(row["push_ms"] > 0 for row in results["durability"].values())
