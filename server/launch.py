"""Runs `optserve serve` as a child process, for the demo and the tests."""

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TextIO


class ServerProcess:
    """A child `optserve serve --port 0`; `address` is known once it listens.

    Its log lines are copied to `log` (stderr by default) by a background
    thread, so the child never blocks on a full pipe.
    """

    def __init__(self, extra_args: Sequence[str] = (), log: TextIO | None = None, start_timeout: float = 120.0,
                 prefix: Sequence[str] = ()):
        """`prefix` runs before the command (e.g. a namespace wrapper that ends with exec "$@")."""
        self._log = log if log is not None else sys.stderr
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "optserve.server.cli", "serve", "--port", "0", *extra_args],
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.port = self._wait_for_port(start_timeout)
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._copy_log, daemon=True).start()

    def stop(self, timeout: float = 30.0) -> int:
        """Sends SIGTERM and waits for a graceful exit; kills after `timeout` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_for_port(self, timeout: float) -> int:
        timer = threading.Timer(timeout, self.process.kill)  # unblocks the read below
        timer.start()
        try:
            for line in self.process.stderr:  # ends when the child exits
                self.lines.append(line)
                match = re.search(r"listening on \S+:(\d+)", line)
                if match:
                    return int(match.group(1))
        finally:
            timer.cancel()
        raise RuntimeError(
            f"optserve serve did not start within {timeout} s (exit status {self.process.poll()}):\n"
            + "".join(self.lines[-20:])
        )

    def _copy_log(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            self._log.write(line)
