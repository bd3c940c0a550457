"""The pieces `server.optimizer.Optimizer` is made of, each on its own: a sync round, the push rate, the journal."""

import threading

import numpy as np
import pytest

from optserve.server import journal, two_phase
from optserve.server.engine import parse_config, pipeline
from optserve.server.engine.config import CONFIG_CLASSES
from optserve.server.errors import Aborted, InvalidArgument
from optserve.server.modes import PushResult, TrainingMode
from optserve.server.push_rate import WINDOW, PushRate
from optserve.server.rounds import SyncRound
from optserve.server.sharding import ShardNorms
from optserve.server.storage import Checkpoint
from optserve.wire.layout import FlatLayout

LAYOUT = FlatLayout({"w": (2, 3), "b": (3,)})


def _grads(value: float) -> dict:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def test_a_round_takes_one_gradient_per_worker_and_combines_them_in_worker_order() -> None:
    round_ = SyncRound("mean", LAYOUT)
    round_.add("b", 7, _grads(3.0), version=4)
    round_.add("a", None, _grads(1.0), version=4)
    with pytest.raises(Aborted, match="worker_id: 'a' has pushed for version 4 already"):
        round_.add("a", 8, _grads(5.0), version=4)
    assert len(round_) == 2 and round_.workers() == ["a", "b"] and round_.sequenced() == [("b", 7)]
    combined, _ = round_.combine()
    np.testing.assert_array_equal(combined["w"], np.full((2, 3), 2.0, np.float32))
    round_.close()
    assert len(round_) == 0 and round_.generation == 1


def test_a_round_gives_back_the_memory_it_held_when_it_closes() -> None:
    round_ = SyncRound("sum", LAYOUT)
    released = []
    round_.add("a", None, _grads(1.0), version=0, retain=lambda: (lambda: released.append("a")))
    round_.add("b", None, _grads(1.0), version=0, retain=lambda: (lambda: released.append("b")))
    assert released == []
    round_.close()
    assert sorted(released) == ["a", "b"]
    round_.close()  # nothing held twice
    assert sorted(released) == ["a", "b"]


def test_a_dropped_round_is_remembered_for_its_own_generation_only() -> None:
    round_ = SyncRound("mean", LAYOUT)
    generation = round_.generation
    round_.add("a", 1, _grads(1.0), version=2)
    round_.drop(3, InvalidArgument("non-finite"))
    round_.close()
    assert round_.was_dropped(3, generation) and round_.was_dropped(3, None)
    assert not round_.was_dropped(3, round_.generation)  # a retry's round for the same version
    assert not round_.was_dropped(4, None)
    assert isinstance(round_.dropped_error, InvalidArgument)


def test_the_round_timer_fires_once_and_a_close_cancels_it() -> None:
    round_ = SyncRound("mean", LAYOUT)
    fired = threading.Event()
    round_.start_timer(0.05, lambda version: fired.set(), version=0)
    round_.start_timer(0.05, lambda version: pytest.fail("a second timer"), version=0)
    assert fired.wait(10)
    round_.timer_fired()
    cancelled = threading.Event()
    round_.start_timer(0.2, lambda version: cancelled.set(), version=1)
    round_.close()
    assert not cancelled.wait(0.5)


def test_the_push_rate_counts_the_window_and_the_last_age() -> None:
    now = [100.0]
    rate = PushRate(capacity=4, clock=lambda: now[0])
    assert rate.per_second() == 0 and rate.last_age() is None
    for t in (90.5, 95.0, 99.0):
        now[0] = t
        rate.accepted()
    now[0] = 100.0
    assert rate.per_second() == 3 / WINDOW and rate.last_age() == 1.0
    now[0] = 104.0  # 90.5 is 13.5 s old, out of the window; 95.0 and 99.0 are in it
    assert rate.per_second() == 2 / WINDOW
    for _ in range(10):
        rate.accepted()
    assert rate.per_second() == 4 / WINDOW  # at most `capacity` remembered


@pytest.mark.parametrize("class_name", list(CONFIG_CLASSES))
def test_a_checkpoint_holds_every_class_and_reads_back_as_it_was(class_name: str) -> None:
    config = parse_config({"use_ema": True, **({"weight_decay": 0.01} if class_name != "AdamW" else {})}, class_name)
    params = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    state = pipeline.init(params, config)
    state = pipeline.make_step(config, list(params))(state, {k: np.full_like(v, 0.25) for k, v in params.items()})
    contents = journal.Contents("opt", config, "refuse", TrainingMode(mode="sync", num_workers=2), state, 1, 3,
                                {"a": [[0, 1, 1]]}, ["b"])
    back = journal.contents_of(journal.checkpoint_of(contents))
    assert (back.name, back.config, back.non_finite_policy, back.training_mode, back.iterations, back.version,
            back.dedup, back.excluded_from_decay) == ("opt", config, "refuse", contents.training_mode, 1, 3,
                                                       {"a": [[0, 1, 1]]}, ["b"])
    want, got = pipeline.export(state), pipeline.export(back.state)
    assert want.keys() == got.keys()
    for slot in want:
        for name in want[slot]:
            np.testing.assert_array_equal(got[slot][name], want[slot][name], err_msg=f"{slot}/{name}")
    assert pipeline.export_scalars(back.state) == pipeline.export_scalars(state)


def test_a_checkpoint_from_before_the_family_is_an_adam_one() -> None:
    config = parse_config({"amsgrad": True})
    state = pipeline.init({"w": np.ones(3, np.float32)}, config)
    checkpoint = journal.checkpoint_of(journal.Contents("old", config, "apply", TrainingMode(), state, 0, 0, {}, None))
    for key in ("optimizer", "scalars", "excluded_from_weight_decay"):
        del checkpoint.meta[key]
    del checkpoint.meta["config"]["adaptive_epsilon"]
    back = journal.contents_of(checkpoint)
    assert back.config == config and list(back.state.slots) == ["m", "v", "vhat"]
    assert back.excluded_from_decay is None


def test_an_adafactor_of_rank_1_tensors_only_restores_its_empty_factors() -> None:
    """Its r and c hold no tensor, so a checkpoint has no entry for them; the restored state still has both."""
    config = parse_config({}, "Adafactor")
    state = pipeline.init({"b": np.ones(3, np.float32)}, config)
    checkpoint = journal.checkpoint_of(journal.Contents("f", config, "refuse", TrainingMode(), state, 0, 0, {}, []))
    stored = {slot: tensors for slot, tensors in checkpoint.slots.items() if tensors}  # what storage writes back
    back = journal.contents_of(Checkpoint(checkpoint.meta, stored))
    assert list(back.state.slots) == ["r", "c", "v"]
    step = pipeline.make_step(config, ["b"])
    np.testing.assert_array_equal(np.asarray(step(back.state, {"b": np.ones(3, np.float32)}).params["b"]),
                                  np.asarray(step(state, {"b": np.ones(3, np.float32)}).params["b"]))
    del stored["v"]
    with pytest.raises(InvalidArgument, match="slots.v: missing; class Adafactor keeps it"):
        journal.contents_of(Checkpoint(checkpoint.meta, stored))


def test_a_version_wait_ends_at_the_version_or_when_told_to_stop_never_by_polling() -> None:
    from optserve.server.versions import VersionGate
    lock = threading.Lock()
    gate = VersionGate(lock, version=3)
    with lock:
        assert gate.wait(3, timeout=0)  # reached already
        assert not gate.wait(4, timeout=0.05)  # the deadline passes
    results = []

    def waiter(stop) -> None:
        with lock:
            results.append(gate.wait(5, timeout=30, stop=stop))

    stopped = threading.Event()
    threads = [threading.Thread(target=waiter, args=(lambda: False,)),
               threading.Thread(target=waiter, args=(stopped.is_set,))]
    for thread in threads:
        thread.start()
    with lock:
        stopped.set()
        gate.notify()  # wakes the second: it stops; the first waits on
    threads[1].join(timeout=10)
    assert results == [True] and gate.version == 3
    with lock:
        assert gate.bump() == 4 and gate.bump() == 5
    threads[0].join(timeout=10)
    assert results == [True, True] and not threads[0].is_alive()


def test_a_two_phase_answer_carries_the_prepared_or_committed_rounds_sums_and_nothing_else() -> None:
    sums = ShardNorms(4.0, {"w[0:2]": 1.0})
    prepared = two_phase.PreparedRound(3, None, [], [], sums, {})
    committed = two_phase.CommittedRound(2, ShardNorms(9.0, {}), ShardNorms(5.0, {}), iterations=2)
    waiting = two_phase.answer(PushResult(3, 2), prepared, committed, version=2, next_iterations=3)
    assert waiting.prepared and waiting.round_square_sums == sums and waiting.iterations == 3
    retried = two_phase.answer(PushResult(2, 1), prepared, committed, version=2, next_iterations=3)
    assert not retried.prepared and retried.round_square_sums == ShardNorms(5.0, {}) and retried.iterations == 2
    applied = two_phase.answer(PushResult(3, 3), prepared, committed, version=3, next_iterations=4)
    assert not applied.prepared and applied.round_square_sums is None
    restored = two_phase.CommittedRound.from_dict(committed.to_dict())
    assert restored == committed
