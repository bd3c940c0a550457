"""Durability under attack (issue 10, items 2-6): lifecycle races, tensor names, log damage, crashed creates,
and a shutdown that cannot save everything. Real servers: child processes where processes matter."""

import hashlib
import json
import resource
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from optserve.client import Client, OptserveError
from optserve.server import storage
from optserve.server.engine import parse_config, pipeline
from optserve.server.options import ServerOptions
from tests.conftest import RunningServer, wait_until
from tests.test_durability import CONFIG, INIT, Server, assert_state_equals, grads_for, reference


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"



def record_offsets(path: Path) -> list[int]:
    """The byte offset of each record of a whole log file (header: magic, payload bytes, CRC)."""
    data, offsets, offset = path.read_bytes(), [], 0
    while offset < len(data):
        offsets.append(offset)
        offset += 16 + struct.unpack_from("<4sQI", data, offset)[1]
    assert offset == len(data)
    return offsets


def exited(server: Server) -> int:
    return server.process.process.wait(timeout=120)


# --- item 2: name, folder and lifecycle change together --------------------------------------------------------


def test_a_create_of_a_name_being_deleted_waits_and_the_new_optimizer_survives_a_restart(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = ServerOptions(host="127.0.0.1", port=0, data_dir=str(data_dir))
    server = RunningServer(options)
    slow_save, released = threading.Event(), threading.Event()
    original_save = storage.OptimizerStore.save

    def save(store, checkpoint):  # the first save of the old "m" stays in its checkpoint until released
        if store.directory.name == "m" and not slow_save.is_set():
            slow_save.set()
            assert released.wait(120)
        return original_save(store, checkpoint)

    create_entered = threading.Event()
    original_create = server.registry.create

    def create(*args, **kwargs):
        create_entered.set()
        return original_create(*args, **kwargs)

    results: dict[str, object] = {}

    def call(what: str, fn, *args) -> None:
        try:
            results[what] = fn(*args)
        except Exception as err:  # noqa: BLE001 - reported by the assertions below
            results[what] = err

    try:
        with Client(server.address, timeout=120) as client:
            old = client.create_optimizer("m", {k: v * 2 for k, v in INIT.items()}, CONFIG)
            old.push(grads_for("old", 0))
            monkeypatch.setattr(storage.OptimizerStore, "save", save)
            monkeypatch.setattr(server.registry, "create", create)
            saving = threading.Thread(target=call, args=("save", old.save))
            saving.start()
            assert slow_save.wait(60)
            deleting = threading.Thread(target=call, args=("delete", client.delete_optimizer, "m"))
            deleting.start()

            def delete_waits() -> bool:  # the delete has taken the name and waits for the checkpoint
                try:
                    client.optimizer("m").info()
                except OptserveError as err:
                    return err.code() == grpc.StatusCode.NOT_FOUND
                return False

            wait_until(delete_waits, "the delete to take the name")
            creating = threading.Thread(target=call, args=(
                "create", client.create_optimizer, "m", INIT, CONFIG))
            creating.start()
            assert create_entered.wait(60)
            creating.join(timeout=2)  # a create that does not wait for the delete ends here (on the old code)
            released.set()
            for thread in (saving, deleting, creating):
                thread.join(timeout=120)
            assert results["save"] == 1 and results["delete"] is None, results
            assert not isinstance(results["create"], Exception), results["create"]
            new = client.optimizer("m")
            for seq in range(3):
                assert new.push(grads_for("a", seq), worker_id="a", seq=seq) == seq + 1
    finally:
        released.set()
        server.stop()
    monkeypatch.undo()
    assert sorted(p.name for p in data_dir.iterdir()) == ["m"]  # the old folder is gone, the new one is whole
    again = RunningServer(options)
    try:
        with Client(again.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 3
            assert_state_equals(opt, reference([("a", s) for s in range(3)]))
    finally:
        again.stop()


def test_a_create_never_removes_a_folder_it_did_not_make(data_dir: Path) -> None:
    server = RunningServer(ServerOptions(host="127.0.0.1", port=0, data_dir=str(data_dir)))
    try:
        stray = data_dir / "m"
        stray.mkdir()
        (stray / "precious").write_bytes(b"an operator's file")
        with Client(server.address, timeout=60) as client:
            with pytest.raises(OptserveError) as caught:
                client.create_optimizer("m", INIT, CONFIG)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value
            assert str(stray) in caught.value.details()
            assert (stray / "precious").read_bytes() == b"an operator's file"
            assert not list(data_dir.glob(".creating-*"))
            assert [o.name for o in client.list_optimizers()] == []
    finally:
        server.stop()


# --- item 3: tensor names never collide in a checkpoint ---------------------------------------------------------

NAMES = ["x", "x.npy", "x.npy.npy", ".npy", "a", "a\0b", "a\0", "\0", "ab", "a/b", "a/", "/", "params/x", "meta",
         "layout", "0", "1", "format", "file", "allow_pickle", "..", "../../etc/passwd", "with space", " ",
         "new\nline", "tab\t", "back\\slash", "quote\"'", "ünïcödé ☃ 漢字 🙂", "\u202eright-to-left",
         "a" * 1000, "a" * 999]


def test_tensor_names_of_every_character_class_survive_a_restart_bit_for_bit(data_dir: Path) -> None:
    rng = np.random.default_rng(3)
    params = {name: rng.normal(size=(i % 3 + 1, 2)).astype(np.float32) for i, name in enumerate(NAMES)}
    grads = [{name: rng.normal(size=p.shape).astype(np.float32) for name, p in params.items()} for _ in range(3)]
    config = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True}
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("names", params, config)
        opt.push(grads[0])
        opt.push(grads[1])
        assert opt.save() == 2
        opt.push(grads[2])  # in the log only
    server.kill()
    engine = parse_config(config)
    state, step = pipeline.init(params, engine), pipeline.make_step(engine, list(params))
    for g in grads:
        state = step(state, g)
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("names")
            assert list(opt.info().tensors) == NAMES
            assert_state_equals(opt, state)
    finally:
        server.process.stop()


def test_a_checkpoint_stores_any_tensor_name_the_codec_admits(tmp_path: Path) -> None:
    """Storage does not care about names: 100 KB names and names equal to archive keys, through save and load."""
    names = ["n" * 100_000, "n" * 99_999 + "\0", "meta", "layout", "params/0", "0"]
    slots = {slot: {name: np.full(2, i + k, np.float32) for i, name in enumerate(names)}
             for k, slot in enumerate(["params", "m", "v"])}
    meta = {"names": names, "version": 0}
    store = storage.OptimizerStore(tmp_path / "opt", "wal")
    store.create(storage.Checkpoint(meta, slots))
    store.close()
    loaded, records, lost = storage.OptimizerStore(tmp_path / "opt", "wal").load()
    assert loaded.meta == meta and records == [] and not lost
    assert {s: list(t) for s, t in loaded.slots.items()} == {s: names for s in slots}
    for slot, tensors in slots.items():
        for name, value in tensors.items():
            np.testing.assert_array_equal(loaded.slots[slot][name], value)


def rewrite_as_format_1(folder: Path, meta: Callable[[dict], dict] = lambda meta: meta) -> None:
    """Rewrites an optimizer folder's newest checkpoint as format 1 wrote it ("<slot>/<tensor name>" keys,
    manifest format 1), its meta changed by `meta` (to make it older still)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["checkpoints"][-1]
    loaded, _, _ = storage.OptimizerStore(folder, "wal").load()
    arrays = {f"{slot}/{name}": value for slot, tensors in loaded.slots.items() for name, value in tensors.items()}
    arrays["meta"] = np.frombuffer(json.dumps(meta(loaded.meta)).encode(), np.uint8)
    old = folder / entry["file"]
    with open(old, "wb") as f:
        np.savez(f, **arrays)
    old_manifest = {"format": 1, "checkpoints": [{"file": entry["file"], "version": entry["version"],
                                                   "sha256": hashlib.sha256(old.read_bytes()).hexdigest()}]}
    (folder / "manifest.json").write_text(json.dumps(old_manifest))


def test_checkpoints_of_format_1_are_still_restored(data_dir: Path) -> None:
    """A data dir written before archive keys became indices ("<slot>/<tensor name>" keys) restores as it was."""
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for seq in range(3):
            opt.push(grads_for("a", seq), worker_id="a", seq=seq)
    assert server.process.stop() == 0
    rewrite_as_format_1(data_dir / "m")
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 3
            assert_state_equals(opt, reference([("a", s) for s in range(3)]))
            assert opt.push(grads_for("a", 2), worker_id="a", seq=2).duplicate
    finally:
        server.process.stop()


# --- item 4: damage in the middle of a log is not a torn tail ---------------------------------------------------


def five_logged_pushes(data_dir: Path, *args: str) -> tuple[Server, Path, bytes, list[int]]:
    """A server killed after five pushes that live only in its log; the log, its bytes and record offsets."""
    server = Server(data_dir, *args).start()
    with Client(server.address, timeout=60) as client:
        opt = client.create_optimizer("m", INIT, CONFIG)
        for seq in range(5):
            opt.push(grads_for("a", seq), worker_id="a", seq=seq)
    server.kill()
    (log_file,) = (data_dir / "m").glob("wal-*.log")
    data = log_file.read_bytes()
    offsets = record_offsets(log_file)
    assert len(offsets) == 5
    return server, log_file, data, offsets


def flip_a_bit_of_record_2(log_file: Path, data: bytes, offsets: list[int]) -> bytes:
    damaged = bytearray(data)
    damaged[offsets[1] + 16 + 40] ^= 0x04  # inside its payload: the CRC no longer matches
    log_file.write_bytes(bytes(damaged))
    return bytes(damaged)


def test_a_bad_record_with_whole_ones_after_it_stops_the_server_and_keeps_the_log(data_dir: Path) -> None:
    server, log_file, data, offsets = five_logged_pushes(data_dir)
    damaged = flip_a_bit_of_record_2(log_file, data, offsets)
    server.start()
    assert exited(server) == 1
    assert f"{log_file}: damaged record at byte {offsets[1]}" in server.text()
    assert "--accept-log-loss" in server.text() and "not serving" in server.text()
    assert log_file.read_bytes() == damaged  # the evidence is kept, byte for byte
    assert sorted(p.name for p in log_file.parent.iterdir()) == ["ckpt-000000000000.npz", "manifest.json",
                                                                 log_file.name]


def test_accept_log_loss_starts_with_the_records_before_the_damage_and_keeps_the_rest(data_dir: Path) -> None:
    server, log_file, data, offsets = five_logged_pushes(data_dir)
    damaged = flip_a_bit_of_record_2(log_file, data, offsets)
    accepting = Server(data_dir, "--accept-log-loss").start()
    try:
        with Client(accepting.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 1
            assert_state_equals(opt, reference([("a", 0)]))
            assert opt.info().saved_version == 1  # checkpointed at once: the next start needs no flag
        assert "ERROR" in accepting.text() and f"damaged record at byte {offsets[1]}" in accepting.text()
        assert log_file.read_bytes() == damaged[:offsets[1]]
        assert (log_file.parent / f"{log_file.name}.lost-{offsets[1]}").read_bytes() == damaged[offsets[1]:]
    finally:
        accepting.kill()
    server.start()  # no flag
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 1
            assert opt.push(grads_for("a", 1), worker_id="a", seq=1) == 2
    finally:
        server.process.stop()


def test_a_log_the_manifest_names_but_the_folder_lacks_stops_the_server(data_dir: Path) -> None:
    server, log_file, _, _ = five_logged_pushes(data_dir)
    log_file.unlink()
    server.start()
    assert exited(server) == 1
    assert f"{log_file}: missing" in server.text()
    accepting = Server(data_dir, "--accept-log-loss")
    accepting.start()
    try:
        with Client(accepting.address, timeout=60) as client:
            assert client.optimizer("m").info().version == 0
        assert "ERROR" in accepting.text()
    finally:
        accepting.process.stop()


def test_a_torn_last_record_is_cut_and_its_bytes_kept_beside_the_log(data_dir: Path) -> None:
    server, log_file, data, offsets = five_logged_pushes(data_dir)
    log_file.write_bytes(data[:-30])  # the last record half written, as a crash mid-write leaves it
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("m")
            assert opt.info().version == 4
            assert_state_equals(opt, reference([("a", s) for s in range(4)]))
        assert log_file.read_bytes() == data[:offsets[4]]
        assert (log_file.parent / f"{log_file.name}.torn-{offsets[4]}").read_bytes() == data[offsets[4]:-30]
    finally:
        server.process.stop()


# --- item 5: a crash during a create blocks nothing --------------------------------------------------------------


def test_sigkill_during_a_create_leaves_nothing_that_blocks_a_restart(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        ok = client.create_optimizer("ok", INIT, CONFIG)
        for seq in range(2):
            ok.push(grads_for("a", seq), worker_id="a", seq=seq)
    big = {f"t{i}": np.ones(8 << 20, np.float32) for i in range(6)}  # 192 MB: its first checkpoint takes a while
    outcome: list[object] = []

    def create() -> None:
        try:
            with Client(server.address, timeout=120) as own:
                outcome.append(own.create_optimizer("big", big, {"learning_rate": 0.1}))
        except OptserveError as err:
            outcome.append(err)

    creating = threading.Thread(target=create)
    creating.start()
    wait_until(lambda: any("big" in p.name for p in data_dir.iterdir()) or outcome, "the create to start writing",
               timeout=120)
    server.kill()  # while the create writes its first checkpoint
    creating.join(timeout=120)
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            opt = client.optimizer("ok")
            assert opt.info().version == 2
            assert_state_equals(opt, reference([("a", 0), ("a", 1)]))
            names = [o.name for o in client.list_optimizers()]
            assert names == ["ok"] or "big" in names and client.optimizer("big").info().version == 0
            assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]
    finally:
        server.process.stop()


def test_a_folder_an_older_version_left_from_an_unacknowledged_create_is_moved_aside(data_dir: Path) -> None:
    server = Server(data_dir).start()
    with Client(server.address, timeout=60) as client:
        client.create_optimizer("ok", INIT, CONFIG).push(grads_for("a", 0))
    server.kill()
    legacy = data_dir / "legacy"  # what an older create left when killed inside its first checkpoint
    legacy.mkdir()
    (legacy / "wal-000000000000.log").write_bytes(b"")
    (legacy / "ckpt-000000000000.npz.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            assert [o.name for o in client.list_optimizers()] == ["ok"]
            assert client.optimizer("ok").info().version == 1
        (aside,) = data_dir.glob(".abandoned-legacy-*")
        assert sorted(p.name for p in aside.iterdir()) == ["ckpt-000000000000.npz.tmp", "wal-000000000000.log"]
        assert "never acknowledged" in server.text() and str(aside) in server.text()
    finally:
        server.process.stop()


# --- item 6: SIGTERM saves everything it can ---------------------------------------------------------------------


def test_sigterm_saves_every_optimizer_it_can_reports_the_others_and_exits_non_zero(data_dir: Path) -> None:
    server = Server(data_dir, "--durability", "none").start()
    big = {"w": np.zeros(1 << 18, np.float32)}  # 1 MiB: its checkpoint (weights, m, v) does not fit below
    with Client(server.address, timeout=60) as client:
        client.create_optimizer("a-big", big, {"learning_rate": 0.1})  # first by name: saved first
        for name in ("b-small", "c-small"):
            client.create_optimizer(name, INIT, CONFIG)
        for seq in range(3):
            client.optimizer("a-big").push({"w": np.ones(1 << 18, np.float32)})
            for name in ("b-small", "c-small"):
                client.optimizer(name).push(grads_for("a", seq), worker_id="a", seq=seq)
    limit = 1 << 20  # bytes any one file may reach: the big checkpoint fails, the small ones fit
    resource.prlimit(server.process.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert server.process.stop() != 0
    assert "could not save optimizer 'a-big'" in server.text()
    server.start()
    try:
        with Client(server.address, timeout=60) as client:
            for name in ("b-small", "c-small"):
                opt = client.optimizer(name)
                assert opt.info().version == 3
                assert_state_equals(opt, reference([("a", s) for s in range(3)]))
            assert client.optimizer("a-big").info().version == 0  # its pushes were lost, and reported
    finally:
        server.process.stop()
