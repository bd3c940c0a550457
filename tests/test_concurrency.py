"""Many threads pushing and pulling at once: no lost, doubled or torn updates."""

import threading

import numpy as np

from optserve.client import Client

TENSORS = ["a", "b", "c"]  # identical tensors: a consistent snapshot has them all equal
CONFIG = {"learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9}
WORKERS, PUSHES = 8, 50


def gradient(worker: int, i: int) -> dict:
    g = np.sin(np.arange(64, dtype=np.float32) * (worker + 1) + i).reshape(8, 8)
    return {name: g for name in TENSORS}


def test_concurrent_pushes_and_pulls_apply_each_push_exactly_once(client: Client, name: str) -> None:
    init = {n: np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8) for n in TENSORS}
    opt = client.create_optimizer(name, init, CONFIG)
    results: dict[int, tuple[int, int]] = {}  # version -> (worker, i)
    snapshots: list = []
    errors: list = []
    pushing_done = threading.Event()

    def push(worker: int) -> None:
        try:
            for i in range(PUSHES):
                version = opt.push(gradient(worker, i))
                assert version not in results, f"version {version} returned twice"
                results[version] = (worker, i)
        except Exception as err:  # surfaced by the main thread
            errors.append(err)

    def pull() -> None:
        try:
            for _ in range(200):  # bounded; stops early once pushing ends
                snapshots.append(opt.pull())
                if pushing_done.is_set():
                    break
        except Exception as err:
            errors.append(err)

    pushers = [threading.Thread(target=push, args=(w,)) for w in range(WORKERS)]
    pullers = [threading.Thread(target=pull) for _ in range(2)]
    for thread in pushers + pullers:
        thread.start()
    for thread in pushers:
        thread.join(timeout=300)
    pushing_done.set()
    for thread in pullers:
        thread.join(timeout=300)
    assert not errors, errors
    total = WORKERS * PUSHES
    assert sorted(results) == list(range(1, total + 1))
    info = opt.info()
    assert info.iterations == total and info.version == total

    for snap in snapshots:  # every pull shows one version: all identical tensors equal
        for n in TENSORS[1:]:
            np.testing.assert_array_equal(snap[n], snap[TENSORS[0]], err_msg=f"torn pull at version {snap.version}")

    # A serial replay in the order the server reports gives the same weights, bit for bit,
    # at the end and at every version a concurrent pull saw.
    replay = client.create_optimizer(name + "-replay", init, CONFIG)
    seen = {snap.version: snap for snap in snapshots}
    for version in range(1, total + 1):
        replay.push(gradient(*results[version]))
        if version in seen:
            np.testing.assert_array_equal(replay.pull()["a"], seen[version]["a"], err_msg=f"version {version}")
    for want, got in [(replay.pull(), opt.pull()), (replay.pull(ema=True), opt.pull(ema=True))]:
        for n in TENSORS:
            np.testing.assert_array_equal(got[n], want[n])
    client.delete_optimizer(name)
    client.delete_optimizer(replay.name)
