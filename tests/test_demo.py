"""`optserve demo`: worker processes train in both modes against a server it starts."""

import re
import subprocess
import sys
from pathlib import Path


def test_demo_trains_with_worker_processes_in_both_modes_and_writes_the_plot(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    run = subprocess.run(
        [sys.executable, "-m", "optserve.server.cli", "demo", "--workers", "2", "--steps", "40", "--plot", str(plot)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for mode in ("sync", "async"):
        losses = [float(x) for x in re.findall(rf"\[{mode}\] \[[#.]+\] +\d+/\d+  held-out loss (\d+\.\d+)", run.stdout)]
        assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0], run.stdout
        raw, ema = map(float, re.search(rf"\[{mode}\] held-out accuracy: raw weights (\S+), EMA weights (\S+)",
                                        run.stdout).groups())
        assert raw > 0.7 and ema > 0.7, run.stdout
    assert "server stopped on SIGTERM, exit status 0" in run.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
