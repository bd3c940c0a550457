"""Sync, async and bounded-staleness modes, exactly-once pushes and versioned pulls, over real gRPC."""

import threading
import time

import grpc
import numpy as np
import pytest

from concurrent.futures import Future, ThreadPoolExecutor

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.engine import parse_config, pipeline
from optserve.server.options import ServerOptions
from tests.conftest import RunningServer
from tests.test_bad_input import assert_same_state, expect_error, snapshot, snapshot_weights
from tests.test_engine import count_compilations

POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="test-worker")


def in_background(call, *args, **kwargs) -> Future:
    """Starts a (blocking) sync push in another thread."""
    return POOL.submit(call, *args, **kwargs)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)

CONFIG = {"learning_rate": 0.05, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9, "global_clipnorm": 1.0}
INIT = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "emb": np.ones((6, 2), np.float32)}


def worker_grads(worker: int, step: int) -> dict:
    rng = np.random.default_rng(100 * step + worker)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "emb": IndexedSlices(indices=rng.integers(0, 6, 3), values=rng.normal(size=(3, 2)).astype(np.float32)),
    }


def engine_mean_step(state, step_fn, grads_by_worker: dict[str, dict]):
    """The engine alone, fed the mean gradient summed in worker-id order (the server's documented order)."""
    workers = sorted(grads_by_worker)
    n = np.float32(len(workers))
    w = grads_by_worker[workers[0]]["w"]
    for worker in workers[1:]:
        w = w + grads_by_worker[worker]["w"]
    indices = np.concatenate([grads_by_worker[k]["emb"].indices for k in workers])
    values = np.concatenate([grads_by_worker[k]["emb"].values for k in workers]) / n
    return step_fn(state, {"w": w / n, "emb": pipeline.sparse_grad(indices, values)})


def run_sync_round(opt, version: int, grads_by_worker: dict[str, dict]) -> list:
    """Each worker pushes from its own thread for `version`, then waits for the round's version."""
    results, errors = {}, []

    def work(worker: str) -> None:
        try:
            pushed = opt.push(grads_by_worker[worker], worker_id=worker, base_version=version)
            results[worker] = (pushed, opt.pull(min_version=pushed, timeout=60))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in grads_by_worker]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return [results[w] for w in sorted(results)]


def test_sync_with_three_workers_is_exactly_adam_on_the_mean_gradient(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG, mode="sync", num_workers=3)
    config = parse_config(CONFIG)
    state, step_fn = pipeline.init(INIT, config), pipeline.make_step(config, list(INIT))
    for step in range(6):
        grads = {f"w{k}": worker_grads(k, step) for k in range(3)}
        for pushed, pulled in run_sync_round(opt, step, grads):
            assert pushed == step + 1 and pulled.version == step + 1
        state = engine_mean_step(state, step_fn, grads)
        got, got_ema = opt.pull(), opt.pull(ema=True)
        for var in INIT:
            np.testing.assert_array_equal(got[var], np.asarray(state.params[var]), err_msg=f"{var} step {step + 1}")
            np.testing.assert_array_equal(got_ema[var], np.asarray(state.ema[var]))
    assert opt.info().iterations == 6
    client.delete_optimizer(name)


def test_pushes_and_sync_rounds_after_the_first_compile_nothing(client: Client, name: str) -> None:
    """The step and the on-device round sum are compiled once, by the first round (or push)."""
    sync = client.create_optimizer(name, INIT, CONFIG, mode="sync", num_workers=3)
    run_sync_round(sync, 0, {f"w{k}": worker_grads(k, 0) for k in range(3)})
    plain = client.create_optimizer(name + "-async", INIT, CONFIG)
    plain.push(worker_grads(0, 0))
    with count_compilations() as compilations:
        for step in range(1, 4):
            run_sync_round(sync, step, {f"w{k}": worker_grads(k, step) for k in range(3)})
            plain.push(worker_grads(0, step))
    assert compilations == []
    assert sync.info().iterations == plain.info().iterations == 4
    client.delete_optimizer(name)
    client.delete_optimizer(plain.name)


def test_sync_sum_aggregation_adds_the_gradients(client: Client, name: str) -> None:
    config = {"learning_rate": 0.1}
    opt = client.create_optimizer(name, {"w": np.zeros(3, np.float32)}, config, mode="sync", num_workers=2,
                                  aggregation="sum")
    twin = client.create_optimizer(name + "-twin", {"w": np.zeros(3, np.float32)}, config)
    first = in_background(opt.push, {"w": np.array([1, 2, 3], np.float32)}, worker_id="a", base_version=0)
    opt.push({"w": np.array([0.5, 0, -4], np.float32)}, worker_id="b", base_version=0)
    assert first.result(timeout=30) == 1
    twin.push({"w": np.array([1.5, 2, -1], np.float32)})
    np.testing.assert_array_equal(opt.pull()["w"], twin.pull()["w"])
    client.delete_optimizer(name)
    client.delete_optimizer(twin.name)


def test_backup_workers_close_the_round_with_the_first_k_and_late_ones_are_aborted(client: Client, name: str):
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {"learning_rate": 0.1}, mode="sync",
                                  num_workers=2, backup_workers=1)
    first = in_background(opt.push, {"w": np.ones(2, np.float32)}, worker_id="a", base_version=0)
    wait_until(lambda: opt.info().pending_gradients == 1)
    assert not first.done()  # a sync push answers when its round has applied
    second = opt.push({"w": np.ones(2, np.float32)}, worker_id="b", base_version=0)
    assert second == 1 and second.iterations == 1
    assert first.result(timeout=30) == 1 and first.result().iterations == 1
    before = snapshot_weights(opt)
    expect_error(grpc.StatusCode.ABORTED, "the round for version 0 is closed", opt.push,
                 {"w": np.ones(2, np.float32)}, worker_id="c", base_version=0)
    assert_same_state(before, snapshot_weights(opt))
    assert opt.info().pending_gradients == 0
    client.delete_optimizer(name)


def test_sync_timeout_closes_the_round_without_the_dead_worker(client: Client, registry, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG, mode="sync", num_workers=3, sync_timeout=0.5)
    grads = {f"w{k}": worker_grads(k, 0) for k in range(2)}  # worker w2 never pushes
    started = time.monotonic()
    for pushed, pulled in run_sync_round(opt, 0, grads):
        assert pushed == 1 and pulled.version == 1
    assert 0.4 < time.monotonic() - started < 30
    assert registry.get(name).rounds_closed_by_timeout == 1
    config = parse_config(CONFIG)
    state = engine_mean_step(pipeline.init(INIT, config), pipeline.make_step(config, list(INIT)), grads)
    np.testing.assert_array_equal(opt.pull()["w"], np.asarray(state.params["w"]))
    # the next round starts clean and closes normally with all three workers
    grads = {f"w{k}": worker_grads(k, 1) for k in range(3)}
    for pushed, pulled in run_sync_round(opt, 1, grads):
        assert pushed == 2 and pulled.version == 2
    assert registry.get(name).rounds_closed_by_timeout == 1
    client.delete_optimizer(name)


def test_sync_push_needs_a_worker_id_and_base_version_and_one_gradient_per_worker(client: Client, name: str):
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {}, mode="sync", num_workers=2)
    g = {"w": np.ones(2, np.float32)}
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "worker_id: required in sync mode", opt.push, g, base_version=0)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "base_version: required in sync mode", opt.push, g, worker_id="a")
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "base_version: 5 is ahead", opt.push, g, worker_id="a",
                 base_version=5)
    waiting = in_background(opt.push, g, worker_id="a", base_version=0)
    wait_until(lambda: opt.info().pending_gradients == 1)
    expect_error(grpc.StatusCode.ABORTED, "'a' has pushed for version 0 already", opt.push, g, worker_id="a",
                 base_version=0)
    assert opt.info().pending_gradients == 1
    client.delete_optimizer(name)  # wakes the waiting push
    with pytest.raises(OptserveError) as caught:
        waiting.result(timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("settings,fragment", [
    ({"mode": "async", "num_workers": 3}, "training_mode.num_workers"),
    ({"mode": "sync", "num_workers": 0}, "training_mode.num_workers: must be >= 1"),
    ({"mode": "sync", "backup_workers": -1}, "training_mode.backup_workers"),
    ({"mode": "sync", "sync_timeout": -1.0}, "training_mode.sync_timeout_seconds"),
    ({"max_staleness": -1}, "training_mode.max_staleness"),
    ({"mode": "sync", "max_staleness": 2}, "training_mode.max_staleness"),
])
def test_bad_training_mode_is_refused(client: Client, name: str, settings: dict, fragment: str) -> None:
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, fragment, client.create_optimizer, name,
                 {"w": np.zeros(2, np.float32)}, {}, **settings)
    assert name not in [info.name for info in client.list_optimizers()]


def test_push_more_than_max_staleness_behind_is_aborted_and_changes_nothing(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {"learning_rate": 0.1}, max_staleness=2)
    assert opt.info().training_mode["max_staleness"] == 2
    g = {"w": np.ones(2, np.float32)}
    for _ in range(3):  # 0, 1 and 2 versions behind: accepted
        opt.push(g, base_version=0)
    before = snapshot_weights(opt)
    error = expect_error(grpc.StatusCode.ABORTED, "3 versions behind the current version 3 (max_staleness 2)",
                         opt.push, g, base_version=0)
    assert "base_version" in error.details()
    assert_same_state(before, snapshot_weights(opt))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "base_version: required when max_staleness is set", opt.push, g)
    assert opt.push(g, base_version=3) == 4
    client.delete_optimizer(name)


def test_retried_worker_seq_is_answered_once_and_not_applied_again(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, INIT, CONFIG)
    first = opt.push(worker_grads(0, 0), worker_id="w3", seq=17)
    assert first == 1 and not first.duplicate
    before = snapshot(opt)
    again = opt.push(worker_grads(1, 1), worker_id="w3", seq=17)  # a retry: its payload is not looked at again
    assert again == 1 and again.duplicate
    assert_same_state(before, snapshot(opt))
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, "seq: 16 is not above worker 'w3'", opt.push,
                 worker_grads(0, 0), worker_id="w3", seq=16)
    assert opt.push(worker_grads(0, 2), worker_id="w3", seq=18) == 2
    assert opt.push(worker_grads(0, 2), worker_id="other", seq=17) == 3  # seqs are per worker
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, "worker_id: required with seq", opt.push, worker_grads(0, 3),
                 seq=30)
    client.delete_optimizer(name)


def test_duplicate_push_in_an_open_sync_round_counts_once(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {}, mode="sync", num_workers=2)
    g = {"w": np.ones(2, np.float32)}
    first = in_background(opt.push, g, worker_id="a", seq=1, base_version=0)
    wait_until(lambda: opt.info().pending_gradients == 1)
    retry = in_background(opt.push, g, worker_id="a", seq=1, base_version=0)  # e.g. after a lost connection
    time.sleep(0.2)
    assert opt.info().pending_gradients == 1 and not retry.done()
    closed = opt.push(g, worker_id="b", seq=1, base_version=0)
    assert closed == 1 and opt.info().iterations == 1
    assert first.result(timeout=30) == 1 and not first.result().duplicate
    assert retry.result(timeout=30) == 1 and retry.result().duplicate
    late_retry = opt.push(g, worker_id="a", seq=1, base_version=0)  # after the round: answered at once
    assert late_retry == 1 and late_retry.duplicate
    assert opt.info().iterations == 1
    client.delete_optimizer(name)


class LoseFirstPushReply(grpc.ServerInterceptor):
    """Lets the first push apply, then answers UNAVAILABLE as if the reply were lost on the way."""

    def __init__(self) -> None:
        self.lost = 0

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if not handler_call_details.method.endswith("/PushGradients"):
            return handler

        def push(request_iterator, context):
            reply = handler.stream_unary(request_iterator, context)
            if self.lost == 0:
                self.lost += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "reply lost (test)")
            return reply

        return handler._replace(stream_unary=push)


def test_client_retries_a_push_whose_reply_was_lost_and_it_applies_once(name: str) -> None:
    lose = LoseFirstPushReply()
    server = RunningServer(ServerOptions(host="127.0.0.1", port=0), interceptors=[lose])
    try:
        with Client(server.address, timeout=30) as flaky:
            opt = flaky.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {"learning_rate": 0.1})
            twin = flaky.create_optimizer(name + "-twin", {"w": np.zeros(2, np.float32)}, {"learning_rate": 0.1})
            result = opt.push({"w": np.ones(2, np.float32)}, worker_id="w", seq=1)
            assert lose.lost == 1 and result == 1 and result.duplicate
            assert opt.info().iterations == 1
            twin.push({"w": np.ones(2, np.float32)})
            np.testing.assert_array_equal(opt.pull()["w"], twin.pull()["w"])
            with pytest.raises(OptserveError):  # without (worker_id, seq) a lost reply is not retried
                lose.lost = 0
                opt.push({"w": np.ones(2, np.float32)})
    finally:
        server.stop()


def test_pull_with_min_version_wakes_exactly_when_that_version_exists(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {"learning_rate": 0.1})
    pulled, woke = [], threading.Event()

    def wait_for_three() -> None:
        pulled.append(opt.pull(min_version=3, timeout=60))
        woke.set()

    waiter = threading.Thread(target=wait_for_three)
    waiter.start()
    for version in (1, 2):
        opt.push({"w": np.ones(2, np.float32)})
        assert not woke.wait(0.3), f"woke at version {version}"
    opt.push({"w": np.ones(2, np.float32)})
    assert woke.wait(30)
    waiter.join(timeout=30)
    assert pulled[0].version == 3
    assert opt.pull(min_version=2).version == 3  # already reached: no wait
    started = time.monotonic()
    expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, "", opt.pull, min_version=10, timeout=0.5)
    assert time.monotonic() - started < 10
    client.delete_optimizer(name)


def test_deleting_an_optimizer_wakes_its_waiting_pulls(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, {"w": np.zeros(2, np.float32)}, {})
    errors = []

    def wait() -> None:
        try:
            opt.pull(min_version=5, timeout=60)
        except OptserveError as err:
            errors.append(err)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    client.delete_optimizer(name)
    waiter.join(timeout=30)
    assert not waiter.is_alive()
    assert errors and errors[0].code() == grpc.StatusCode.NOT_FOUND
