"""Hosts in their own network namespaces, joined by rate-limited links: a small cluster on one machine.

`LinkedHosts(names, rate_mbit)` makes one namespace per host and one for a
switch (a Linux bridge); each host reaches the bridge over a veth pair whose
both ends are shaped by `tc` to `rate_mbit`, so a host sends and receives at
most that rate, as a machine behind one network link does. Host i has the
address 10.213.0.(i+1) inside its namespace and nothing outside it; leaving
the `with` block deletes every namespace (and so every link). Processes join
a host with `host.command(argv)` (`ip netns exec`). It needs root and the
`ip` and `tc` commands of iproute2; `unavailable()` says why it cannot run.
"""

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.0"  # host i is SUBNET.(i+1)/24, inside the namespaces only
NETNS_DIR = Path("/run/netns")  # where `ip netns` names namespaces
PREFIX = "osb"  # namespace names: osb<pid>-<host>, so a run never touches another's
COMMAND_TIMEOUT = 30.0  # seconds one ip/tc command may take


class NetnsError(RuntimeError):
    """An `ip` or `tc` command failed; the message has the command and its error."""


@dataclass(frozen=True)
class Host:
    """One host: its namespace and its address there."""

    name: str
    netns: str
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def unavailable() -> str | None:
    """Why namespaces with shaped links cannot be made here (not root, no `ip` or `tc`), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth links and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs the {' and '.join(missing)} command(s) of iproute2 (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetnsError, OSError) as err:
        return f"cannot create a network namespace: {err}"
    try:
        _run(["ip", "netns", "del", probe])
    except NetnsError:
        pass
    return None


def _run(argv: Sequence[str]) -> None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv)}: no answer in {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit status {done.returncode}'}")


def remove_stale() -> list[str]:
    """Deletes the namespaces that runs which have ended left behind (killed before they cleaned up)."""
    removed = []
    for path in sorted(NETNS_DIR.glob(f"{PREFIX}*-*")) if NETNS_DIR.is_dir() else []:
        pid = path.name[len(PREFIX):].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                _run(["ip", "netns", "del", path.name])
                removed.append(path.name)
            except NetnsError:
                pass
    return removed


class LinkedHosts:
    """Namespaces `names`, each linked to one bridge at `rate_mbit` each way; a context manager.

    `hosts[name]` is a `Host`. Every link is shaped by a token bucket (`tbf`)
    on both of its ends: the host's end limits what the host sends, the
    bridge's end what it receives.
    """

    def __init__(self, names: Sequence[str], rate_mbit: float):
        if not names or len(set(names)) != len(names) or len(names) > 250:
            raise ValueError(f"names: 1 to 250 distinct host names, got {list(names)}")
        if not rate_mbit > 0:
            raise ValueError(f"rate_mbit: must be positive, got {rate_mbit}")
        self.rate_mbit = rate_mbit
        self._prefix = f"{PREFIX}{os.getpid()}-"
        self._switch = self._prefix + "switch"
        self.hosts = {name: Host(name, f"{self._prefix}{name}", f"{SUBNET}.{i + 1}") for i, name in enumerate(names)}
        self._made: list[str] = []

    def __enter__(self) -> "LinkedHosts":
        try:
            self._add_namespace(self._switch)
            _run(["ip", "-n", self._switch, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", self._switch, "link", "set", "br0", "up"])
            for index, host in enumerate(self.hosts.values()):
                self._link(index, host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Deletes every namespace made (their links go with them); safe to call twice."""
        errors = []
        while self._made:
            netns = self._made.pop()
            try:
                _run(["ip", "netns", "del", netns])
            except NetnsError as err:
                errors.append(str(err))
        if errors:
            raise NetnsError("; ".join(errors))

    def _add_namespace(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._made.append(netns)
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _link(self, index: int, host: Host) -> None:
        """Host `index`: its namespace, a veth pair to the bridge, its address, both ends shaped."""
        self._add_namespace(host.netns)
        port = f"p{index}"
        _run(["ip", "link", "add", "eth0", "netns", host.netns, "type", "veth", "peer", "name", port,
              "netns", self._switch])
        _run(["ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0"])
        _run(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", self._switch, "link", "set", port, "master", "br0"])
        _run(["ip", "-n", self._switch, "link", "set", port, "up"])
        for netns, device in ((host.netns, "eth0"), (self._switch, port)):
            _run(["tc", "-n", netns, "qdisc", "add", "dev", device, "root", *self._shaper()])

    def _shaper(self) -> list[str]:
        """A token bucket at the link rate: a burst of 4 ms of traffic (at least 64 KiB), 50 ms of queue."""
        burst = max(64 * 1024, int(self.rate_mbit * 1e6 / 8 * 0.004))
        return ["tbf", "rate", f"{self.rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]
