"""Keras's non-trainable variables (BatchNorm's moving statistics) kept on the server: RemoteOptimizer(model=...)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("this module runs on Keras's JAX backend; KERAS_BACKEND says otherwise", allow_module_level=True)
keras = pytest.importorskip("keras", reason="the keras extra (pip install '.[keras]') is not installed")
from optserve.client import Client  # noqa: E402
from optserve.keras import RemoteOptimizer  # noqa: E402

WORKER = Path(__file__).with_name("keras_state_worker.py")
ADAM = {"learning_rate": 0.01}
STATE = ["state/0/moving_mean", "state/1/moving_variance"]


def _model(weights=None) -> "keras.Model":
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, use_bias=False), keras.layers.BatchNormalization(),
                              keras.layers.Activation("tanh"), keras.layers.Dense(3)])
    if weights is not None:
        model.set_weights(weights)
    return model


def _fit(model, optimizer, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(320, 8)).astype(np.float32), rng.integers(0, 3, 320)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert model.jit_compile and not model.run_eagerly


def test_batchnorm_statistics_live_on_the_server_and_fit_equals_local_keras(client: Client, name: str) -> None:
    initial = _model().get_weights()
    local = _model(initial)
    _fit(local, keras.optimizers.Adam(**ADAM))
    remote = _model(initial)
    optimizer = RemoteOptimizer(client, name, ADAM, model=remote)
    try:
        _fit(remote, optimizer)
        info = optimizer.remote.info()
        assert info.iterations == 10
        pulled = optimizer.remote.pull()
        assert [n for n in pulled.keys() if n.startswith("state/")] == STATE
        for want, got in zip(local.get_weights(), remote.get_weights()):  # moving statistics included
            np.testing.assert_allclose(got, want, atol=1e-5)
        for state_name, variable in zip(STATE, remote.non_trainable_variables):
            np.testing.assert_array_equal(np.asarray(variable.value), pulled[state_name])
        assert np.abs(np.asarray(remote.non_trainable_variables[0].value)).max() > 1e-3  # the statistics moved
    finally:
        client.delete_optimizer(name)


def test_without_model_the_statistics_stay_local(client: Client, name: str) -> None:
    remote = _model()
    try:
        _fit(remote, RemoteOptimizer(client, name, ADAM))
        assert not [n for n in client.optimizer(name).pull().keys() if n.startswith("state/")]
        assert np.abs(np.asarray(remote.non_trainable_variables[0].value)).max() > 1e-3
    finally:
        client.delete_optimizer(name)


def test_a_model_that_is_not_a_keras_model_is_refused(client: Client, name: str) -> None:
    with pytest.raises(ValueError, match="model"):
        RemoteOptimizer(client, name, ADAM, model=[1, 2])


def test_two_sync_worker_processes_end_with_the_rounds_mean_statistics(server, tmp_path: Path) -> None:
    """Each worker sees other data, so only the server's averaging can make their statistics equal."""
    name = "keras-state-sync"
    workers = [subprocess.Popen([sys.executable, str(WORKER), server.address, name, str(index), str(tmp_path)],
                                env={**os.environ, "KERAS_BACKEND": "jax"}) for index in range(2)]
    try:
        for worker in workers:
            assert worker.wait(timeout=240) == 0
    finally:
        for worker in workers:
            worker.kill()
    with Client(server.address) as client:
        opt = client.optimizer(name)
        assert opt.info().iterations == 5
        pulled = opt.pull()
        ends = [np.load(tmp_path / f"worker-{index}.npz") for index in range(2)]
        for state_name in STATE:
            np.testing.assert_array_equal(ends[0][state_name], ends[1][state_name])
            np.testing.assert_array_equal(ends[0][state_name], pulled[state_name])
        assert np.abs(ends[0][STATE[0]]).max() > 0.01  # they moved (the workers' data differ: loc 0 and 1)
        client.delete_optimizer(name)
