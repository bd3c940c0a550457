"""A logical optimizer over three in-process servers: placement recorded and checked, the API, the modes, refusals."""

import socket
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.client.sharded import ShardedClient, _shard_to_wire, resolve
from optserve.server.options import ServerOptions
from optserve.v1 import optserve_pb2 as pb
from tests.conftest import RunningServer, serving
from tests.test_bad_input import assert_same_state, expect_error

PARAMS = {"emb": np.linspace(-1, 1, 120, dtype=np.float32).reshape(40, 3), "w": np.ones((6, 4), np.float32),
          "b": np.zeros(4, np.float32), "s": np.float32(0.5)}
SMALL = 64  # bytes: emb and w are split


def grads_for(seq: int, sparse: bool = True) -> dict:
    rng = np.random.default_rng(seq)
    emb = IndexedSlices(rng.integers(0, 40, 6), rng.normal(size=(6, 3)).astype(np.float32)) if sparse else \
        rng.normal(size=(40, 3)).astype(np.float32)
    return {"emb": emb, "w": rng.normal(size=(6, 4)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32),
            "s": np.float32(rng.normal())}


@pytest.fixture(scope="module")
def servers() -> Iterator[list[RunningServer]]:
    generators = [serving() for _ in range(4)]
    try:
        yield [next(g) for g in generators]
    finally:
        for generator in generators:
            generator.close()


@pytest.fixture(scope="module")
def addresses(servers) -> list[str]:
    return [s.address for s in servers[:3]]  # the fourth server is a stranger to the logical optimizers


@pytest.fixture(scope="module")
def sharded(addresses) -> Iterator[ShardedClient]:
    with Client(addresses, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def single(servers) -> Iterator[Client]:
    """A one-server client of the fourth server, for reference runs."""
    with Client(servers[3].address, timeout=30.0) as client:
        yield client


@pytest.fixture
def plain(addresses) -> Iterator[list[Client]]:
    """One-server clients of each shard."""
    clients = [Client(a, timeout=30.0) for a in addresses]
    yield clients
    for c in clients:
        c.close()


def same_weights(got, want, exact: bool = False) -> None:
    assert list(got) == list(want)
    for name in want:
        if exact:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        else:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def same_after_finalize(opt, ref) -> None:
    """Both optimizers finalized: the same weights."""
    opt.finalize()
    ref.finalize()
    same_weights(opt.pull(), ref.pull())


def test_a_list_or_dns_name_gives_a_sharded_client_and_one_address_the_plain_one(addresses) -> None:
    with Client(addresses[0]) as one:
        assert type(one) is Client
    with Client(addresses) as many:
        assert isinstance(many, ShardedClient) and many.addresses == addresses


def test_the_placement_is_recorded_on_every_shard_with_one_digest(sharded, plain, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, {"learning_rate": 0.1}, max_shard_bytes=SMALL)
    try:
        infos = [c.optimizer(name).info() for c in plain]
        assert [i.shard["index"] for i in infos] == [0, 1, 2]
        assert {i.shard["digest"] for i in infos} == {infos[0].shard["digest"]}
        assert all(i.shard["count"] == 3 and len(i.shard["pieces"]) == len(opt.placement.pieces) for i in infos)
        for index, info in enumerate(infos):  # each holds exactly its pieces
            assert list(info.tensors) == [p.name for p in opt.placement.of_shard(index)]
        logical = opt.info()
        assert logical.tensors == {k: (np.shape(v), "float32") for k, v in PARAMS.items()}
        assert len(logical.shards) == 3 and logical.version == 0
        assert [i.name for i in sharded.list_optimizers()].count(name) == 1
    finally:
        sharded.delete_optimizer(name)
    expect_error(grpc.StatusCode.NOT_FOUND, "not found on any", sharded.optimizer, name)


def test_an_address_list_that_disagrees_with_the_placement_is_refused_naming_the_address(
        sharded, servers, addresses, name) -> None:
    sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL)
    try:
        with Client(addresses[::-1]) as reversed_order:
            expect_error(grpc.StatusCode.FAILED_PRECONDITION, f"address {addresses[2]}: holds shard 2 of 3",
                         reversed_order.optimizer, name)
        with Client(addresses[:2]) as too_few:
            error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, "this client lists 2 addresses",
                                 too_few.optimizer, name)
            assert addresses[0] in error.details()
        with Client([*addresses[:2], servers[3].address]) as stranger:
            expect_error(grpc.StatusCode.FAILED_PRECONDITION, f"address {servers[3].address}: holds no optimizer",
                         stranger.optimizer, name)
        with Client([*addresses, servers[3].address]) as too_many:
            expect_error(grpc.StatusCode.FAILED_PRECONDITION, "holds no optimizer", too_many.optimizer, name)
        assert sharded.optimizer(name).info().version == 0  # the refusals changed nothing
    finally:
        sharded.delete_optimizer(name)


def test_shards_of_two_different_placements_are_not_one_optimizer(sharded, addresses, name) -> None:
    sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL)
    other_name = name[:100] + "-other"
    with Client(addresses[:2] + [addresses[2]]) as same:
        same.create_optimizer(other_name, PARAMS, max_shard_bytes=SMALL * 4)
    try:
        with Client(addresses[0]) as first:  # shard 0 replaced by a shard of the other placement
            first.delete_optimizer(name)
            info = first.optimizer(other_name).info()
        with Client(addresses[0]) as first:
            shard = info.shard
            table = pb.ShardDescription(index=0, count=3, max_shard_bytes=shard["max_shard_bytes"], pieces=[
                pb.ShardPiece(name=n, tensor=t, shard=s, row_start=a, row_stop=b, tensor_shape=sh)
                for n, t, s, a, b, sh in shard["pieces"]])
            part = {p[0]: PARAMS[p[1]][p[3]:p[4]] if np.ndim(PARAMS[p[1]]) else PARAMS[p[1]]
                    for p in shard["pieces"] if p[2] == 0}
            first.create_optimizer(name, part, shard=table)
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, "not shards of one optimizer", sharded.optimizer, name)
    finally:
        sharded.delete_optimizer(name)
        sharded.delete_optimizer(other_name)


def test_a_dns_name_finds_every_shard_and_orders_them_by_the_index_they_report(monkeypatch, name) -> None:
    port = _free_port("127.0.0.1")
    hosts = ["127.0.0.3", "127.0.0.1", "127.0.0.2"]
    running = []
    try:
        for host in hosts:
            running.append(RunningServer(ServerOptions(host=host, port=port, bulk_port=-1)))
        real = socket.getaddrinfo

        def headless(host, *args, **kwargs):  # what a headless Service's name resolves to: one record per pod
            if host == "optserve-headless.test":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (h, port)) for h in hosts]
            return real(host, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", headless)
        target = f"dns:///optserve-headless.test:{port}"
        assert resolve(target) == [f"127.0.0.{i}:{port}" for i in (1, 2, 3)]
        with Client(target) as client:
            opt = client.create_optimizer(name, PARAMS, max_shard_bytes=SMALL)
            opt.push(grads_for(0))
        with Client([f"127.0.0.{i}:{port}" for i in (2, 1, 3)]) as wrong:  # a list must be in shard order
            expect_error(grpc.StatusCode.FAILED_PRECONDITION, "list the shards in their order", wrong.optimizer, name)
        hosts.reverse()  # another resolver order: the servers' indices still order the shards
        with Client(target) as client:
            again = client.optimizer(name)
            assert again.info().version == 1
            assert client.addresses == [f"127.0.0.{i}:{port}" for i in (1, 2, 3)]
            assert [s.address for s in client.shards] == client.addresses
    finally:
        for server in running:
            server.stop()


@pytest.mark.parametrize("config", [
    {"learning_rate": 0.05},
    {"learning_rate": 0.05, "clipnorm": 0.5, "amsgrad": True},
    {"learning_rate": 0.05, "global_clipnorm": 0.5, "use_ema": True},
    {"learning_rate": 0.05, "weight_decay": 0.1, "exclude_from_weight_decay": ["emb$", "^s$"]},
], ids=["plain", "clipnorm", "global_clipnorm", "weight_decay_exclusions"])
def test_sharded_steps_match_one_server_with_sparse_rows_on_their_shards(sharded, single, name, config) -> None:
    opt = sharded.create_optimizer(name, PARAMS, config, max_shard_bytes=SMALL)
    ref = single.create_optimizer(name, PARAMS, config)
    try:
        for seq in range(4):
            grads = grads_for(seq, sparse=seq % 2 == 0)
            assert opt.push(grads, worker_id="w", seq=seq) == ref.push(grads)
        same_weights(opt.pull(), ref.pull())
        same_weights(opt.pull_slot("m"), ref.pull_slot("m"))
        same_weights(opt.pull(names=["w", "s"]), ref.pull(names=["w", "s"]))
        into = opt.pull()
        refilled = opt.pull(into=into)
        assert refilled["emb"].base is not None and np.shares_memory(refilled["emb"], into["emb"])
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "into", opt.pull, names=["w"], into=into)
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


def test_a_sparse_row_reaches_only_the_shard_that_owns_it_rebased(sharded, plain, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, {"learning_rate": 0.1}, max_shard_bytes=SMALL)
    try:
        owner = next(p for p in opt.placement.of_tensor("emb") if p.start > 0)
        row = owner.start + 1
        grads = {**grads_for(0), "emb": IndexedSlices(np.array([row]), np.ones((1, 3), np.float32))}
        opt.push(grads)
        for piece in opt.placement.of_tensor("emb"):
            got = plain[piece.shard].optimizer(name).pull(names=[piece.name])[piece.name]
            moved = np.flatnonzero(np.any(got != PARAMS["emb"][piece.start:piece.stop], axis=1))
            assert list(moved) == ([row - piece.start] if piece is owner else []), piece
    finally:
        sharded.delete_optimizer(name)


def test_bad_gradients_are_refused_before_any_shard_is_touched(sharded, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL)
    try:
        opt.push(grads_for(0))
        before = {k: v.copy() for k, v in opt.pull().items()}
        good = grads_for(1)
        for grads, fragment in [
            ({k: v for k, v in good.items() if k != "w"}, "gradients['w']: missing"),
            ({**good, "extra": np.ones(2)}, "gradients['extra']"),
            ({**good, "w": np.ones((6, 5), np.float32)}, "gradients['w'].shape"),
            ({**good, "emb": IndexedSlices(np.array([40]), np.ones((1, 3), np.float32))}, "gradients['emb'].indices"),
            ({**good, "emb": IndexedSlices(np.array([1]), np.ones((1, 4), np.float32))}, "gradients['emb'].values"),
        ]:
            expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, opt.push, grads)
        nan = {**good, "w": np.full((6, 4), np.nan, np.float32)}
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "gradients['w']: contains NaN", opt.push, nan)
        assert [s.version for s in opt.info().shards] == [1, 1, 1]  # not only the shards without w's pieces
        assert_same_state(before, {k: v for k, v in opt.pull().items()})
    finally:
        sharded.delete_optimizer(name)


def test_a_retried_push_is_applied_once_on_every_shard(sharded, single, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL)
    ref = single.create_optimizer(name, PARAMS)
    try:
        first = opt.push(grads_for(0), worker_id="w", seq=7)
        again = opt.push(grads_for(0), worker_id="w", seq=7)
        ref.push(grads_for(0))
        assert (int(first), first.duplicate, int(again), again.duplicate) == (1, False, 1, True)
        same_weights(opt.pull(), ref.pull(), exact=True)
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


def test_max_staleness_counts_logical_versions(sharded, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL, max_staleness=1)
    try:
        for seq in range(3):
            opt.push(grads_for(seq), base_version=opt.pull().version)
        expect_error(grpc.StatusCode.ABORTED, "max_staleness 1", opt.push, grads_for(9), base_version=1)
        assert opt.info().version == 3 and [s.version for s in opt.info().shards] == [3, 3, 3]
    finally:
        sharded.delete_optimizer(name)


def _sync_round(opts: list, round_: int, workers: int = 2) -> None:
    """Sync round `round_` on each optimizer of `opts`: `workers` threads push one gradient each."""
    for target in opts:
        errors = []

        def work(worker: int) -> None:
            try:
                target.push(grads_for(10 * round_ + worker), worker_id=f"w{worker}", seq=round_, base_version=round_)
            except OptserveError as err:
                errors.append(err)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors and not any(t.is_alive() for t in threads), errors


@pytest.mark.parametrize("config", [
    {"learning_rate": 0.1, "use_ema": True},
    {"learning_rate": 0.1, "global_clipnorm": 0.5},
    {"learning_rate": 0.1, "clipnorm": 0.5, "use_ema": True},
], ids=["plain", "global_clipnorm", "clipnorm"])
def test_sync_rounds_over_shards_match_one_server_and_pulls_see_one_round(sharded, single, name, config) -> None:
    settings = dict(mode="sync", num_workers=2, sync_timeout=30.0)
    opt = sharded.create_optimizer(name, PARAMS, config, max_shard_bytes=SMALL, **settings)
    ref = single.create_optimizer(name, PARAMS, config, **settings)
    try:
        for round_ in range(3):
            _sync_round([opt, ref], round_)
            pulled = opt.pull(min_version=round_ + 1)
            assert pulled.versions == (round_ + 1,) * 3
        same_weights(opt.pull(), ref.pull())
        if config.get("use_ema"):
            same_weights(opt.pull(ema=True), ref.pull(ema=True))
        same_after_finalize(opt, ref)
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


def test_a_push_some_shards_find_too_stale_is_completed_by_them_when_the_others_applied_it(
        sharded, plain, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, max_shard_bytes=SMALL, max_staleness=1)
    try:
        ahead = plain[0].optimizer(name)  # shard 0 two versions ahead, as in-flight pushes can leave it
        for seq in range(2):
            ahead.push({p.name: np.ones(p.shape, np.float32) for p in opt.placement.of_shard(0)}, base_version=seq)
        result = opt.push(grads_for(0), worker_id="w", seq=0, base_version=0)
        assert result.versions == (3, 1, 1) and opt.info().version == 1
        assert opt.push(grads_for(1), worker_id="w", seq=1, base_version=1).versions == (4, 2, 2)
        expect_error(grpc.StatusCode.ABORTED, "no shard applied the push", opt.push, grads_for(2), worker_id="w",
                     seq=2, base_version=0)  # stale on every shard: refused whole
        assert [s.version for s in opt.info().shards] == [4, 2, 2]
        # the largest shard version as base (a push's own answer): ahead of shards 1 and 2, which complete it
        assert opt.push(grads_for(3), worker_id="w", seq=3, base_version=4).versions == (5, 3, 3)
    finally:
        sharded.delete_optimizer(name)


@pytest.mark.parametrize("config, settings, fragment", [
    ({}, dict(mode="sync", num_workers=2, backup_workers=1), "backup_workers"),
])
def test_sync_settings_no_shard_can_serve_exactly_are_refused_and_nothing_is_left(
        sharded, plain, name, config, settings, fragment) -> None:
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, fragment, sharded.create_optimizer, name, PARAMS, config,
                 max_shard_bytes=SMALL, **settings)
    for client in plain:
        assert name not in [info.name for info in client.list_optimizers()]


def test_a_create_one_shard_refuses_is_rolled_back_on_the_others(sharded, plain, addresses, name) -> None:
    plain[1].create_optimizer(name, {"x": np.ones(2, np.float32)})
    try:
        error = expect_error(grpc.StatusCode.ALREADY_EXISTS, f"shard 1 ({addresses[1]})", sharded.create_optimizer,
                             name, PARAMS, max_shard_bytes=SMALL)
        assert error
        for index in (0, 2):
            assert name not in [info.name for info in plain[index].list_optimizers()]
    finally:
        plain[1].delete_optimizer(name)


def test_a_server_refuses_a_shard_whose_tensors_are_not_its_pieces(plain, name) -> None:
    from optserve.wire.placement import place

    table = place({k: np.shape(v) for k, v in PARAMS.items()}, 3, SMALL)
    mine = {p.name: np.zeros(p.shape, np.float32) for p in table.of_shard(0)}
    wrong = dict(list(mine.items())[1:])
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "tensors: shard 0 of the table holds", plain[0].create_optimizer,
                 name, wrong, shard=_shard_to_wire(0, table))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "shard.index", plain[0].create_optimizer, name, mine,
                 shard=_shard_to_wire(5, table))
    broken = _shard_to_wire(0, table)
    del broken.pieces[1]  # a gap in emb's rows
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "shard.pieces[1]: rows", plain[0].create_optimizer, name, mine,
                 shard=broken)
    assert name not in [info.name for info in plain[0].list_optimizers()]


def test_a_shard_that_clips_refuses_pushes_without_or_with_bad_norm_inputs(sharded, plain, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, {"clipnorm": 1.0}, max_shard_bytes=SMALL)
    try:
        opt.push(grads_for(0))
        shard = plain[0].optimizer(name)
        pieces = opt.placement.of_shard(0)
        grads = {p.name: np.ones(p.shape, np.float32) for p in pieces}
        split = [p.name for p in pieces if not p.whole]
        before = {k: v.copy() for k, v in shard.pull().items()}
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "norm_inputs: required", shard.push, grads)
        for bad, fragment in [
            (pb.NormInputs(global_square_sum=-1.0, tensor_square_sums={n: 0.0 for n in split}), "global_square_sum"),
            (pb.NormInputs(tensor_square_sums={**{n: 0.0 for n in split}, split[0]: float("nan")}), split[0]),
            (pb.NormInputs(tensor_square_sums={}), "required (clipnorm"),
            (pb.NormInputs(tensor_square_sums={**{n: 0.0 for n in split}, "nope": 1.0}), "'nope'"),
        ]:
            expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, shard.push, grads, norm_inputs=bad)
        assert_same_state(before, {k: v.copy() for k, v in shard.pull().items()})
        assert shard.info().version == 1
    finally:
        sharded.delete_optimizer(name)


def test_a_one_server_optimizer_refuses_norm_inputs(single, name) -> None:
    opt = single.create_optimizer(name, {"w": np.ones(3, np.float32)}, {"global_clipnorm": 1.0})
    try:
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "norm_inputs: this optimizer is no shard", opt.push,
                     {"w": np.ones(3, np.float32)}, norm_inputs=pb.NormInputs(global_square_sum=1.0))
        assert opt.info().version == 0
    finally:
        single.delete_optimizer(name)


def test_a_shard_keeps_its_placement_across_a_restart(tmp_path, name) -> None:
    data_dirs = [tmp_path / f"s{i}" for i in range(3)]
    ports = [_free_port("127.0.0.1") for _ in range(3)]

    def start(i: int) -> RunningServer:
        return RunningServer(ServerOptions(host="127.0.0.1", port=ports[i], data_dir=str(data_dirs[i]), bulk_port=-1))

    running = [start(i) for i in range(3)]
    try:
        addresses = [r.address for r in running]
        with Client(addresses) as client:
            opt = client.create_optimizer(name, PARAMS, {"clipnorm": 1.0}, max_shard_bytes=SMALL)
            opt.push(grads_for(0), worker_id="w", seq=0)
            digest = opt.info().shard["digest"]
            before = {k: v.copy() for k, v in opt.pull().items()}
        running[1].stop()
        running[1] = start(1)
        with Client(addresses) as client:
            opt = client.optimizer(name)
            assert opt.info().shard["digest"] == digest and [s.shard["index"] for s in opt.info().shards] == [0, 1, 2]
            same_weights(opt.pull(), before, exact=True)
            assert opt.push(grads_for(0), worker_id="w", seq=0).duplicate  # the dedup table came back too
    finally:
        for r in running:
            r.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_a_two_phase_round_is_prepared_then_committed_once_with_one_set_of_sums(sharded, plain, name) -> None:
    opt = sharded.create_optimizer(name, PARAMS, {"global_clipnorm": 0.5}, max_shard_bytes=SMALL, mode="sync")
    try:
        client = plain[0]
        shard = client.optimizer(name)
        grads = {p.name: np.ones(p.shape, np.float32) for p in opt.placement.of_shard(0)}
        answer = shard.push(grads, worker_id="w", seq=0, base_version=0)
        assert answer.prepared and int(answer) == 1 and shard.info().version == 0
        own = answer.round_square_sums.global_square_sum
        assert own == pytest.approx(sum(np.prod(p.shape) for p in opt.placement.of_shard(0)))
        expect_error(grpc.StatusCode.ABORTED, "waits for its commit", shard.push, grads, worker_id="x", seq=0,
                     base_version=0)
        retried = shard.push(grads, worker_id="w", seq=0, base_version=0)
        assert retried.prepared and retried.duplicate

        def commit(version: int, total: float | None):
            request = pb.CommitRoundRequest(optimizer=name, version=version)
            if total is not None:
                request.norm_inputs.global_square_sum = total
            return client._call(client._stub.CommitRound, lambda: request)

        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "norm_inputs: required", commit, 1, None)
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "global_square_sum", commit, 1, float("inf"))
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, "no round for version 2", commit, 2, 1.0)
        assert shard.info().version == 0  # the refusals applied nothing
        first = commit(1, 3.0)
        assert first.version == 1 and not first.duplicate and shard.info().version == 1
        again = commit(1, 3.0)
        assert again.duplicate and again.version == 1 and shard.info().version == 1
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, "committed with other sums", commit, 1, 4.0)
        after = shard.push(grads, worker_id="w", seq=0, base_version=0)
        assert after.duplicate and not after.prepared and after.round_square_sums.global_square_sum == own
    finally:
        sharded.delete_optimizer(name)


def test_an_optimizer_without_two_phase_rounds_refuses_a_commit(single, name) -> None:
    single.create_optimizer(name, {"w": np.ones(3, np.float32)}, mode="sync")
    try:
        request = pb.CommitRoundRequest(optimizer=name, version=1, norm_inputs=pb.NormInputs(global_square_sum=1.0))
        expect_error(grpc.StatusCode.FAILED_PRECONDITION, "has no two-phase rounds", single._call,
                     single._stub.CommitRound, lambda: request)
    finally:
        single.delete_optimizer(name)


def test_a_list_of_one_address_serves_a_plain_optimizer(addresses, single, name) -> None:
    config = {"learning_rate": 0.1, "global_clipnorm": 0.5}
    with Client(addresses[:1]) as one:
        opt = one.create_optimizer(name, PARAMS, config, max_shard_bytes=SMALL)
        try:
            assert opt.info().shard is None and all(p.whole for p in opt.placement.pieces)
            ref = single.create_optimizer(name, PARAMS, config)
            opt.push(grads_for(0))
            ref.push(grads_for(0))
            same_weights(opt.pull(), ref.pull(), exact=True)
            with Client(addresses[0]) as plain_client:  # and one-server clients use it as it is
                assert plain_client.optimizer(name).info().version == 1
        finally:
            one.delete_optimizer(name)
            single.delete_optimizer(name)


def test_a_repeated_commit_after_a_checkpointed_restart_is_still_answered_and_checked(tmp_path, name) -> None:
    port = _free_port("127.0.0.1")

    def start() -> RunningServer:
        return RunningServer(ServerOptions(host="127.0.0.1", port=port, data_dir=str(tmp_path), bulk_port=-1))

    from optserve.wire.placement import place

    table = place({"w": (8, 2)}, 2, 16)
    server = start()
    try:
        with Client(server.address) as client:
            client.create_optimizer(name, {p.name: np.ones(p.shape, np.float32) for p in table.of_shard(0)},
                                    {"global_clipnorm": 1.0}, mode="sync", shard=_shard_to_wire(0, table))
            shard = client.optimizer(name)
            grads = {p.name: np.ones(p.shape, np.float32) for p in table.of_shard(0)}
            assert shard.push(grads, worker_id="w", seq=0, base_version=0).prepared
            request = pb.CommitRoundRequest(optimizer=name, version=1, norm_inputs=pb.NormInputs(global_square_sum=2.0))
            assert client._call(client._stub.CommitRound, lambda: request).version == 1
            shard.save()  # the log starts over: the commit must be in the checkpoint
        server.stop()
        server = start()
        with Client(server.address) as client:
            again = client._call(client._stub.CommitRound, lambda: request)
            assert again.duplicate and again.version == 1
            other = pb.CommitRoundRequest(optimizer=name, version=1, norm_inputs=pb.NormInputs(global_square_sum=3.0))
            expect_error(grpc.StatusCode.FAILED_PRECONDITION, "committed with other sums", client._call,
                         client._stub.CommitRound, lambda: other)
    finally:
        server.stop()


@pytest.mark.parametrize("optimizer, config", [
    ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    ("RMSprop", {"learning_rate": 0.01, "centered": True, "momentum": 0.5, "clipnorm": 0.5}),
    ("Adagrad", {"learning_rate": 0.1}),
    ("Ftrl", {"learning_rate": 0.1, "l1_regularization_strength": 0.01, "global_clipnorm": 0.5}),
    ("Nadam", {"learning_rate": 0.01, "use_ema": True}),
    ("Lion", {"learning_rate": 0.01, "weight_decay": 0.1}),
    ("Adam", {"learning_rate": 0.01, "adaptive_epsilon": True}),
], ids=lambda value: value if isinstance(value, str) else None)
def test_every_class_over_split_shards_matches_one_server(sharded, single, name, optimizer, config) -> None:
    """The family's classes over three shards, tensors split: the same steps, slots and finalize as one server."""
    opt = sharded.create_optimizer(name, PARAMS, config, optimizer=optimizer, max_shard_bytes=SMALL)
    ref = single.create_optimizer(name, PARAMS, config, optimizer=optimizer)
    try:
        assert opt.info().optimizer == optimizer and list(opt.info().slots) == list(ref.info().slots)
        for seq in range(4):
            grads = grads_for(seq, sparse=seq % 2 == 0)
            assert opt.push(grads, worker_id="w", seq=seq) == ref.push(grads)
        same_weights(opt.pull(), ref.pull())
        for slot in ref.info().slots:
            same_weights(opt.pull_slot(slot), ref.pull_slot(slot))
        same_after_finalize(opt, ref)
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


def test_adafactor_is_refused_when_a_tensor_would_be_split_and_served_when_whole(sharded, single, plain, name) -> None:
    """Adafactor's factors and relative step read the whole tensor: split pieces would give other numbers."""
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "max_shard_bytes", sharded.create_optimizer, name, PARAMS,
                 {}, optimizer="Adafactor", max_shard_bytes=SMALL)
    for client in plain:  # the rollback left no part behind
        expect_error(grpc.StatusCode.NOT_FOUND, name, client.optimizer, name)
    opt = sharded.create_optimizer(name, PARAMS, {}, optimizer="Adafactor")
    ref = single.create_optimizer(name, PARAMS, {}, optimizer="Adafactor")
    try:
        for seq in range(3):
            grads = grads_for(seq, sparse=False)
            assert opt.push(grads) == ref.push(grads)
        same_weights(opt.pull(), ref.pull())
        for slot in ref.info().slots:
            same_weights(opt.pull_slot(slot), ref.pull_slot(slot))
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


@pytest.mark.parametrize("config", [{"learning_rate": 0.05}, {"learning_rate": 0.05, "clipnorm": 0.5},
                                    {"learning_rate": 0.05, "global_clipnorm": 0.5}],
                         ids=["plain", "clipnorm", "global_clipnorm"])
def test_a_partial_push_over_shards_skips_the_same_tensors_as_one_server(sharded, single, name, config) -> None:
    """missing='skip' over split shards: the tensors without a gradient keep weights and moments, as on one server."""
    opt = sharded.create_optimizer(name, PARAMS, config, max_shard_bytes=SMALL)
    ref = single.create_optimizer(name, PARAMS, config)
    try:
        for seq in range(4):
            grads = grads_for(seq, sparse=False)
            del grads["emb" if seq % 2 else "w"]
            assert opt.push(grads, missing="skip") == ref.push(grads, missing="skip")
        same_weights(opt.pull(), ref.pull())
        same_weights(opt.pull_slot("m"), ref.pull_slot("m"))
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "missing", opt.push, {"b": np.ones(4, np.float32)})
        assert opt.info().version == 4
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)


def test_a_sharded_optimizer_takes_pytrees_none_leaves_and_refuses_what_it_cannot_shard(sharded, single, name) -> None:
    """Nested params name their tensors by path; a None gradient is a skipped tensor; state= is refused clearly."""
    tree = {"enc": {"emb": PARAMS["emb"], "w": PARAMS["w"]}, "b": PARAMS["b"]}
    opt = sharded.create_optimizer(name, tree, {"learning_rate": 0.05}, max_shard_bytes=SMALL)
    ref = single.create_optimizer(name, tree, {"learning_rate": 0.05})
    try:
        assert list(opt.info().tensors) == ["enc/emb", "enc/w", "b"]
        grads = grads_for(0, sparse=False)
        push = {"enc": {"emb": grads["emb"], "w": None}, "b": grads["b"]}
        assert opt.push(push, missing="skip") == ref.push(push, missing="skip")
        same_weights(opt.pull(), ref.pull())
        pulled = opt.pull(like=tree)
        assert list(pulled) == ["enc", "b"] and list(pulled["enc"]) == ["emb", "w"]
        np.testing.assert_array_equal(pulled["enc"]["emb"], ref.pull()["enc/emb"])
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "like", opt.pull, names=["b"], like=tree)
        expect_error(grpc.StatusCode.INVALID_ARGUMENT, "enc/w", opt.push, push)
        assert opt.info().version == 1
    finally:
        sharded.delete_optimizer(name)
        single.delete_optimizer(name)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "state", sharded.create_optimizer, name, tree,
                 state={"mean": np.zeros(3, np.float32)})


def test_a_sharded_sync_round_is_never_closed_by_timeout_on_one_shard_alone(sharded, plain, name) -> None:
    """A straggler timeout would let each shard close the round with other workers: sharded rounds wait until full."""
    opt = sharded.create_optimizer(name, PARAMS, {"learning_rate": 0.05}, mode="sync", num_workers=2,
                                   sync_timeout=0.2, max_shard_bytes=SMALL)
    try:
        results = []
        worker = threading.Thread(target=lambda: results.append(
            opt.push(grads_for(0, sparse=False), worker_id="a", seq=0, base_version=0)), daemon=True)
        worker.start()
        worker.join(timeout=1.5)  # seven sync timeouts: a one-server round would have closed
        assert worker.is_alive() and not results
        for client in plain:
            info = client.optimizer(name).info()
            assert info.version == 0 and info.pending_gradients == 1
        opt.push(grads_for(1, sparse=False), worker_id="b", seq=0, base_version=0)
        worker.join(timeout=30)
        assert results == [1] and opt.info().version == 1
    finally:
        sharded.delete_optimizer(name)
