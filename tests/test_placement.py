"""The placement of a sharded optimizer's tensors: deterministic, balanced, split by rows, checked."""

import math

import pytest

from optserve.wire import placement
from tests.model_layouts import bert_base, embedding_and_dense, resnet50


@pytest.mark.parametrize("layout", [resnet50, bert_base, embedding_and_dense])
@pytest.mark.parametrize("count", [2, 3, 4, 8])
def test_no_shard_holds_more_than_1_1_times_the_mean_on_real_layouts(layout, count: int) -> None:
    shapes = layout()
    table = placement.place(shapes, count)
    loads = table.loads()
    assert sum(loads) == 4 * sum(math.prod(shape) for shape in shapes.values())
    assert max(loads) <= 1.1 * sum(loads) / count, loads
    assert table.tensors == shapes  # every tensor, in creation order


def test_a_tensor_over_max_shard_bytes_is_split_by_rows_into_near_equal_pieces() -> None:
    table = placement.place({"emb": (10, 3), "b": (3,)}, 3, max_shard_bytes=40)
    pieces = table.of_tensor("emb")
    assert [(p.start, p.stop) for p in pieces] == [(0, 3), (3, 6), (6, 10)]
    assert [p.name for p in pieces] == ["emb[0:3]", "emb[3:6]", "emb[6:10]"]
    assert [p.shape for p in pieces] == [(3, 3), (3, 3), (4, 3)]
    assert sorted(p.shard for p in pieces) == [0, 1, 2]  # spread, the largest first
    assert table.of_tensor("b")[0].name == "b" and table.of_tensor("b")[0].whole


def test_placement_is_deterministic_and_its_digest_names_it() -> None:
    shapes = bert_base()
    first, second = placement.place(shapes, 3), placement.place(dict(shapes), 3)
    assert first == second and placement.digest(first) == placement.digest(second)
    assert placement.digest(placement.place(shapes, 4)) != placement.digest(first)
    assert placement.from_dict(placement.to_dict(first)) == first


def test_one_shard_splits_nothing_and_scalars_and_single_rows_stay_whole() -> None:
    assert all(p.whole for p in placement.place({"w": (1000, 1000)}, 1, max_shard_bytes=4).pieces)
    table = placement.place({"s": (), "row": (1, 10_000), "empty": (0, 4)}, 3, max_shard_bytes=4)
    assert all(p.whole for p in table.pieces) and [p.shape for p in table.pieces] == [(), (1, 10_000), (0, 4)]


@pytest.mark.parametrize("change, message", [
    (lambda p: p[:1], "end at row"),  # a piece missing
    (lambda p: p[:1] + p[2:] + p[1:2], "must start at row"),  # out of order
    (lambda p: [_with(p[0], shard=7)] + p[1:], "shard"),
    (lambda p: [_with(p[0], name="x")] + p[1:], "name"),
])
def test_check_refuses_a_table_that_does_not_cover_each_tensor_once(change, message: str) -> None:
    table = placement.place({"emb": (10, 3)}, 3, max_shard_bytes=40)
    broken = placement.Placement(3, 40, tuple(change(list(table.pieces))))
    with pytest.raises(ValueError, match=message):
        placement.check(broken)


def test_a_piece_name_equal_to_another_tensor_is_refused() -> None:
    with pytest.raises(ValueError, match="used twice"):
        placement.place({"emb": (10, 3), "emb[0:3]": (2,)}, 3, max_shard_bytes=40)


@pytest.mark.parametrize("count, max_bytes, field", [(0, 4, "shards"), (2, 0, "max_shard_bytes")])
def test_bad_arguments_are_refused_by_name(count: int, max_bytes: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        placement.place({"w": (4,)}, count, max_bytes)


def _with(piece: placement.Piece, **changes) -> placement.Piece:
    fields = {**piece.__dict__, **changes}
    return placement.Piece(**fields)
