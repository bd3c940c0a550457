"""Where the tensors of one logical optimizer live when it spans several servers (shards).

`place` is a pure, deterministic function of the tensors' shapes, the shard
count and `max_shard_bytes`: a tensor larger than `max_shard_bytes` is cut
by rows (axis 0) into near-equal pieces, and the pieces (whole tensors
included) are dealt largest first onto the least loaded shard. Client and
server share this module: the client computes the table, every server
checks and stores it (`check`), and `digest` names one table.
"""

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# BytePS partitions at about 4 MB: small enough that the largest piece (which bounds the imbalance of a
# greedy placement) is a small part of a shard, large enough that a piece's fixed costs (a header entry,
# a segment of the flat state, a row range to slice) stay negligible beside its bytes.
DEFAULT_MAX_SHARD_BYTES = 4 << 20


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one logical tensor, held by one shard under `name`."""

    name: str  # the tensor's name on its shard
    tensor: str  # the logical tensor's name
    shard: int  # index of the shard that holds it
    start: int  # first row (axis 0); 0 for a scalar
    stop: int  # one past the last row; 1 for a scalar
    tensor_shape: tuple[int, ...]  # the logical tensor's shape

    @property
    def shape(self) -> tuple[int, ...]:
        """The piece's own shape: the rows it holds of the logical tensor."""
        if not self.tensor_shape:
            return ()
        return (self.stop - self.start, *self.tensor_shape[1:])

    @property
    def whole(self) -> bool:
        """True when the piece is the whole tensor."""
        return self.start == 0 and self.stop == _rows(self.tensor_shape)


@dataclass(frozen=True)
class Placement:
    """Every piece of every shard, in the logical tensors' order, then by rows."""

    count: int  # shards
    max_shard_bytes: int
    pieces: tuple[Piece, ...]

    def of_shard(self, index: int) -> list[Piece]:
        """The pieces shard `index` holds, in its layout order."""
        return [piece for piece in self.pieces if piece.shard == index]

    def of_tensor(self, tensor: str) -> list[Piece]:
        """The pieces of one logical tensor, by rows."""
        return [piece for piece in self.pieces if piece.tensor == tensor]

    @property
    def tensors(self) -> dict[str, tuple[int, ...]]:
        """The logical tensors and their shapes, in creation order."""
        return {piece.tensor: piece.tensor_shape for piece in self.pieces}

    def loads(self) -> list[int]:
        """Bytes of parameters per shard."""
        loads = [0] * self.count
        for piece in self.pieces:
            loads[piece.shard] += 4 * math.prod(piece.shape)
        return loads


def piece_name(tensor: str, start: int, stop: int, whole: bool) -> str:
    """The name a piece has on its shard: the tensor's own name when whole, else `name[start:stop]`."""
    return tensor if whole else f"{tensor}[{start}:{stop}]"


def place(shapes: Mapping[str, Sequence[int]], count: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
          ) -> Placement:
    """The placement of float32 tensors `shapes` (creation order) over `count` shards.

    A tensor over `max_shard_bytes` with at least two rows becomes
    min(rows, ceil(bytes / max_shard_bytes)) pieces of near-equal rows; then
    pieces go, largest first (ties: creation order, then rows), onto the
    shard holding the fewest bytes (ties: the lowest index). One shard: no
    splitting. ValueError (naming the field) for a bad argument or a piece
    name that is also another tensor's name.
    """
    if count < 1:
        raise ValueError(f"shards: need at least one, got {count}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: must be >= 1, got {max_shard_bytes}")
    items = []  # (bytes, tensor order, start, stop, tensor, shape)
    for order, (tensor, shape) in enumerate(shapes.items()):
        shape = tuple(int(d) for d in shape)
        rows = _rows(shape)
        nbytes = 4 * math.prod(shape)
        parts = 1 if count == 1 or len(shape) == 0 or rows < 2 else max(1, min(rows, -(-nbytes // max_shard_bytes)))
        bounds = [rows * i // parts for i in range(parts + 1)]
        for start, stop in zip(bounds, bounds[1:]):
            items.append((4 * math.prod((stop - start, *shape[1:])) if shape else 4, order, start, stop, tensor,
                          shape))
    loads = [0] * count
    shard_of = {}
    for nbytes, order, start, stop, tensor, shape in sorted(items, key=lambda item: (-item[0], item[1], item[2])):
        shard = min(range(count), key=lambda index: (loads[index], index))
        loads[shard] += nbytes
        shard_of[tensor, start] = shard
    pieces = tuple(Piece(piece_name(tensor, start, stop, stop - start == _rows(shape)), tensor,
                         shard_of[tensor, start], start, stop, shape)
                   for _, _, start, stop, tensor, shape in sorted(items, key=lambda item: (item[1], item[2])))
    placement = Placement(count, max_shard_bytes, pieces)
    check(placement)
    return placement


def check(placement: Placement) -> None:
    """ValueError naming the field unless the table is whole: each tensor's pieces cover its rows once, in order.

    Also refuses a piece name used twice (a piece named like another tensor).
    """
    if placement.count < 1:
        raise ValueError(f"shard.count: must be >= 1, got {placement.count}")
    if not placement.pieces:
        raise ValueError("shard.pieces: empty")
    names, next_row, shapes = set(), {}, {}
    for index, piece in enumerate(placement.pieces):
        field = f"shard.pieces[{index}]"
        if not piece.name or not piece.tensor:
            raise ValueError(f"{field}: needs a name and a tensor")
        if piece.name in names:
            raise ValueError(f"{field}.name: {piece.name!r} is used twice (a piece named like another tensor?)")
        names.add(piece.name)
        if not 0 <= piece.shard < placement.count:
            raise ValueError(f"{field}.shard: must be in [0, {placement.count}), got {piece.shard}")
        if any(d < 0 for d in piece.tensor_shape):
            raise ValueError(f"{field}.tensor_shape: negative dimension in {piece.tensor_shape}")
        if shapes.setdefault(piece.tensor, piece.tensor_shape) != piece.tensor_shape:
            raise ValueError(f"{field}.tensor_shape: {piece.tensor_shape}, but an earlier piece of "
                             f"{piece.tensor!r} says {shapes[piece.tensor]}")
        expected = next_row.get(piece.tensor, 0)
        if piece.start != expected or not piece.start < piece.stop <= _rows(piece.tensor_shape) and \
                not (piece.start == piece.stop == 0 == _rows(piece.tensor_shape)):
            raise ValueError(f"{field}: rows [{piece.start}, {piece.stop}) of {piece.tensor!r} "
                             f"{piece.tensor_shape}; the next piece must start at row {expected}")
        if piece.name != piece_name(piece.tensor, piece.start, piece.stop, piece.whole):
            raise ValueError(f"{field}.name: must be "
                             f"{piece_name(piece.tensor, piece.start, piece.stop, piece.whole)!r}, got {piece.name!r}")
        next_row[piece.tensor] = piece.stop
    for tensor, stop in next_row.items():
        if stop != _rows(shapes[tensor]):
            raise ValueError(f"shard.pieces: the pieces of {tensor!r} end at row {stop} of {_rows(shapes[tensor])}")


def digest(placement: Placement) -> str:
    """The table's SHA-256 (hex) over a canonical JSON form: equal digests, equal placements."""
    table = [placement.count, placement.max_shard_bytes,
             [[p.name, p.tensor, p.shard, p.start, p.stop, list(p.tensor_shape)] for p in placement.pieces]]
    return hashlib.sha256(json.dumps(table, separators=(",", ":")).encode()).hexdigest()


def to_dict(placement: Placement) -> dict:
    """The table as plain data (for a checkpoint's metadata)."""
    return {"count": placement.count, "max_shard_bytes": placement.max_shard_bytes,
            "pieces": [[p.name, p.tensor, p.shard, p.start, p.stop, list(p.tensor_shape)] for p in placement.pieces]}


def from_dict(data: Mapping) -> Placement:
    """The table `to_dict` wrote."""
    return Placement(int(data["count"]), int(data["max_shard_bytes"]),
                     tuple(Piece(n, t, int(s), int(a), int(b), tuple(int(d) for d in shape))
                           for n, t, s, a, b, shape in data["pieces"]))


def _rows(shape: Sequence[int]) -> int:
    """Rows along axis 0; a scalar is one row."""
    return int(shape[0]) if len(shape) else 1
