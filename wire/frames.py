"""The framing of a bulk channel, shared by client and server (see proto/optserve/v1, OpenBulkChannel).

The client's first bytes on a new connection are the ticket (TICKET_BYTES); the
server answers ACK once the channel is bound. Each transfer then is one FRAME
(transfer number, byte length; little-endian) and exactly that many raw bytes:
the tensors' little-endian bytes back to back, in the order the header declares.
"""

import socket
import struct
from collections.abc import Iterable

import numpy as np

from optserve.wire.dtypes import as_little_endian

FRAME = struct.Struct("<QQ")  # transfer number, byte length
TICKET_BYTES = 32
ACK = b"\x01"


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    """`nbytes` from `sock`, or fewer if the peer closed first; never more (nothing past them is read)."""
    data = bytearray(nbytes)
    view, got = memoryview(data), 0
    while got < nbytes:
        count = sock.recv_into(view[got:], nbytes - got)
        if not count:
            break
        got += count
    view.release()
    return bytes(data[:got])


def send_frame(sock: socket.socket, number: int, arrays: Iterable[np.ndarray]) -> None:
    """Sends one transfer: its frame, then each array's bytes straight from the array (no copy)."""
    views = [memoryview(as_little_endian(array).reshape(-1).view(np.uint8)) for array in arrays]
    sock.sendall(FRAME.pack(number, sum(len(view) for view in views)))
    for view in views:
        if len(view):
            sock.sendall(view)
