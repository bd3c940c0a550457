"""The bench's namespace harness: hosts in their own network namespaces, linked through shaped veth pairs.

Needs root and iproute2's `ip` and `tc`; skipped, saying which is missing, elsewhere.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from optserve.server.bench import netns

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"namespace harness: {REASON}")

ECHO_SERVER = """
import socket, sys
listener = socket.create_server((sys.argv[1], 0))
print(listener.getsockname()[1], flush=True)
connection, peer = listener.accept()
received = 0
while chunk := connection.recv(65536):
    received += len(chunk)
connection.sendall(f"{received} from {peer[0]}".encode())
connection.close()
"""

SENDER = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    connection.sendall(b"x" * 1_000_000)
    connection.shutdown(socket.SHUT_WR)
    print(connection.recv(100).decode())
"""


def _namespaces() -> set[str]:
    return {path.name for path in netns.NETNS_DIR.glob("*")} if netns.NETNS_DIR.is_dir() else set()


def _ours(names: set[str]) -> set[str]:
    return {name for name in names if name.startswith(netns.PREFIX)}


def test_two_hosts_reach_each_other_only_inside_their_namespaces_and_vanish_after() -> None:
    before = _namespaces()
    with netns.LinkedHosts(["server", "worker"], rate_mbit=200) as network:
        server, worker = network.hosts["server"], network.hosts["worker"]
        assert {server.netns, worker.netns} <= _namespaces()
        echo = subprocess.Popen(server.command([sys.executable, "-c", ECHO_SERVER, server.address]),
                                stdout=subprocess.PIPE, text=True)
        try:
            port = echo.stdout.readline().strip()
            sent = subprocess.run(worker.command([sys.executable, "-c", SENDER, server.address, port]),
                                  capture_output=True, text=True, timeout=60)
            assert sent.stdout.strip() == f"1000000 from {worker.address}", sent.stderr
        finally:
            echo.kill()
            echo.wait(10)
        for host in (server, worker):
            shaped = subprocess.run(["tc", "-n", host.netns, "qdisc", "show", "dev", "eth0"],
                                    capture_output=True, text=True, timeout=30).stdout
            assert "tbf" in shaped and "200Mbit" in shaped, shaped
        root_addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
        assert netns.SUBNET not in root_addresses  # nothing of the cluster outside its namespaces
    assert _ours(_namespaces()) == _ours(before)


def test_a_link_that_cannot_be_made_leaves_no_namespace_behind() -> None:
    before = _namespaces()
    with pytest.raises(netns.NetnsError, match="netns add"):
        with netns.LinkedHosts(["a", "b/c"], rate_mbit=100):  # the second namespace cannot be named so
            pass
    assert _ours(_namespaces()) == _ours(before)


def test_namespaces_of_a_run_that_died_are_removed_and_live_ones_kept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = f"{netns.PREFIX}{dead.pid}-left"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=30)
    try:
        with netns.LinkedHosts(["alive"], rate_mbit=100) as network:
            removed = netns.remove_stale()
            assert stale in removed and network.hosts["alive"].netns not in removed
            assert network.hosts["alive"].netns in _namespaces()
    finally:
        if (netns.NETNS_DIR / stale).exists():
            subprocess.run(["ip", "netns", "del", stale], timeout=30)
    assert not (netns.NETNS_DIR / stale).exists()


def test_the_scale_out_section_is_skipped_saying_why_when_the_links_cannot_be_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from optserve.server.bench import scaleout

    monkeypatch.setattr(netns.LinkedHosts, "_shaper", lambda self: ["tbf", "nonsense"])  # tc refuses it
    before = _namespaces()
    result = scaleout.measure_scale_out((1, 2), 1, 1000, 2, 0.1, 100)
    assert result["rows"] == [] and "cannot build the namespaces and links" in result["skipped"]
    assert "tc" in result["skipped"]
    assert _ours(_namespaces()) == _ours(before)
