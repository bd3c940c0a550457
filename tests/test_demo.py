"""`optserve demo` runs end to end against a server it starts, and the loss goes down."""

import re
import subprocess
import sys


def test_demo_trains_against_a_live_server() -> None:
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", "demo", "--steps", "50"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(x) for x in re.findall(r"held-out loss (\d+\.\d+)", run.stdout)]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], run.stdout
    accuracy = float(re.search(r"accuracy, EMA weights: (\d\.\d+)", run.stdout).group(1))
    assert accuracy > 0.8, run.stdout
    assert "server stopped cleanly on SIGTERM" in run.stdout
