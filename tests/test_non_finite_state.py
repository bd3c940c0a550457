"""non_finite_policy "refuse": a push whose step would make any state value non-finite changes nothing.

Finite gradients can still overflow the state (v = g * g, the global norm, a huge learning rate);
"refuse" (the default) refuses such a step whole, "apply" keeps Keras's non-finite result.
"""

import threading

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, OptserveError
from optserve.server.engine import parse_config, pipeline
from tests.test_bad_input import assert_same_state, expect_error, snapshot

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PARAMS = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "emb": np.ones((4, 2), np.float32)}
BASE = {"learning_rate": 0.01, "amsgrad": True, "use_ema": True, "ema_momentum": 0.9}


def good() -> dict:
    """Touches every element, so that even epsilon 0 gives a finite step."""
    return {"w": np.full((2, 3), 0.1, np.float32),
            "emb": IndexedSlices(np.array([1, 3, 0, 2, 1]), np.ones((5, 2), np.float32))}


def huge(value: float = 3e38) -> dict:
    return {"w": np.full((2, 3), value, np.float32), "emb": IndexedSlices(np.array([0]), np.ones((1, 2), np.float32))}


def big_for_lr() -> dict:
    return {"w": np.full((2, 3), 1000.0, np.float32), "emb": IndexedSlices(np.array([0]), np.ones((1, 2), np.float32))}


def zero() -> dict:
    return {"w": np.zeros((2, 3), np.float32), "emb": IndexedSlices(np.array([0]), np.zeros((1, 2), np.float32))}


CASES = [  # (id, config changes, the finite gradients pushed twice, whether a good push comes first)
    ("v overflows", {}, huge, True),
    ("global_clipnorm norm overflows", {"global_clipnorm": 1.0}, huge, True),
    ("clipnorm norm overflows", {"clipnorm": 2.0}, huge, True),
    ("learning rate overflows the update", {"learning_rate": 1e38}, big_for_lr, True),
    ("epsilon 0 and a zero first gradient: 0 / 0", {"epsilon": 0.0}, zero, False),
]


def _engine(config: dict, pushes: list[dict]) -> pipeline.OptimizerState:
    """Keras's numbers: the engine's plain (in-place, unchecked) step."""
    parsed = parse_config(config)
    state, step = pipeline.init(PARAMS, parsed), pipeline.make_step(parsed, list(PARAMS))
    for grads in pushes:
        device = {k: pipeline.sparse_grad(g.indices, g.values) if isinstance(g, IndexedSlices) else g
                  for k, g in grads.items()}
        state = step(state, device)
    return state


@pytest.mark.parametrize("changes,grads,warm", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refuse_keeps_the_state_and_apply_gives_keras_result(client: Client, name: str, changes, grads, warm) -> None:
    config = {**BASE, **changes}
    opt = client.create_optimizer(name, PARAMS, config)
    twin = client.create_optimizer(name + "-twin", PARAMS, config)
    first = [good()] if warm else []
    for push in first:
        opt.push(push)
        twin.push(push)
    before = snapshot(opt)
    for _ in range(2):
        expect_error(INVALID, "non-finite", opt.push, grads())
        assert_same_state(before, snapshot(opt))  # params, m, v, vhat, ema, iterations and version
    opt.push(good())  # as if the refused pushes never came
    twin.push(good())
    assert_same_state(snapshot(twin), snapshot(opt))

    applied = client.create_optimizer(name + "-apply", PARAMS, config, non_finite_policy="apply")
    for push in [*first, grads(), grads()]:
        applied.push(push)
    want = _engine(config, [*first, grads(), grads()])
    assert not all(np.isfinite(np.asarray(want.params[k])).all() and np.isfinite(np.asarray(want.v[k])).all()
                   for k in PARAMS)  # Keras's own result is non-finite
    for kind, pulled in [("params", applied.pull()), ("ema", applied.pull(ema=True)), ("m", applied.pull_slot("m")),
                         ("v", applied.pull_slot("v")), ("vhat", applied.pull_slot("vhat"))]:
        for tensor, value in pulled.items():
            np.testing.assert_array_equal(value, np.asarray(getattr(want, kind)[tensor]), err_msg=f"{kind}/{tensor}")
    for created in (name, name + "-twin", name + "-apply"):
        client.delete_optimizer(created)


def test_sync_round_whose_aggregate_would_be_non_finite_refuses_every_push(client: Client, name: str) -> None:
    opt = client.create_optimizer(name, PARAMS, BASE, mode="sync", num_workers=2, sync_timeout=60)
    before = snapshot(opt)
    errors: dict[str, Exception] = {}

    def push(worker: str, grads: dict) -> None:
        try:
            opt.push(grads, worker_id=worker, seq=0, base_version=0)
        except OptserveError as err:
            errors[worker] = err

    workers = [threading.Thread(target=push, args=("good", good())),
               threading.Thread(target=push, args=("bad", huge()))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert sorted(errors) == ["bad", "good"], errors
    for err in errors.values():
        assert err.code() == INVALID and "non-finite" in err.details(), err
    assert_same_state(before, snapshot(opt))
    # the round starts over: the same (worker, seq) pairs are not duplicates now
    retries = [threading.Thread(target=push, args=(w, good())) for w in ("good", "bad")]
    errors.clear()
    for worker in retries:
        worker.start()
    for worker in retries:
        worker.join(timeout=120)
    assert errors == {} and opt.info().version == 1
    client.delete_optimizer(name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_create_with_non_finite_parameters_is_refused_under_refuse(client: Client, name: str, bad: float) -> None:
    params = {"w": np.ones(3, np.float32), "emb": np.array([[0.0, bad]], np.float32)}
    expect_error(INVALID, "tensors['emb']: contains NaN or Inf", client.create_optimizer, name, params)
    assert name not in [info.name for info in client.list_optimizers()]
    client.create_optimizer(name, params, non_finite_policy="apply")  # as Keras would
    client.delete_optimizer(name)
