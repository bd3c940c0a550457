"""Which transport each client connection uses, per optimizer, and the bytes it moved (for `optserve status`)."""

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

MAX_CLIENTS = 64  # connections remembered per optimizer, the least recent forgotten first


@dataclass
class ClientTraffic:
    """The tensor bytes one connection moved for one optimizer by one transport."""

    peer: str
    transport: str
    bytes_received: int = 0
    bytes_sent: int = 0
    last_seen: float = 0.0  # time.monotonic()


class Traffic:
    """A bounded table of (optimizer, peer, transport) -> bytes moved, safe to update from any thread."""

    def __init__(self, max_clients: int = MAX_CLIENTS):
        self._max_clients = max_clients
        self._by_optimizer: dict[str, OrderedDict[tuple[str, str], ClientTraffic]] = {}
        self._lock = threading.Lock()

    def count(self, optimizer: str, peer: str, transport: str, received: int = 0, sent: int = 0) -> None:
        """Adds bytes moved by `peer` through `transport`."""
        with self._lock:
            clients = self._by_optimizer.setdefault(optimizer, OrderedDict())
            entry = clients.pop((peer, transport), None) or ClientTraffic(peer, transport)
            entry.bytes_received += received
            entry.bytes_sent += sent
            entry.last_seen = time.monotonic()
            clients[(peer, transport)] = entry
            while len(clients) > self._max_clients:
                clients.popitem(last=False)

    def clients(self, optimizer: str) -> list[ClientTraffic]:
        """Copies of the optimizer's entries, most recent first."""
        with self._lock:
            entries = list(self._by_optimizer.get(optimizer, {}).values())
        return [ClientTraffic(e.peer, e.transport, e.bytes_received, e.bytes_sent, e.last_seen)
                for e in reversed(entries)]

    def forget(self, optimizer: str) -> None:
        """Drops a deleted optimizer's entries."""
        with self._lock:
            self._by_optimizer.pop(optimizer, None)
