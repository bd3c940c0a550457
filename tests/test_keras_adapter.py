"""optserve.keras.RemoteOptimizer: compiled model.fit on Keras's JAX backend, with local Keras Adam's numbers."""

import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    pytest.skip("optserve.keras runs on Keras's JAX backend; KERAS_BACKEND says otherwise", allow_module_level=True)
keras = pytest.importorskip("keras", reason="the keras extra (pip install '.[keras]') is not installed")
from optserve.client import Client  # noqa: E402
from optserve.keras import RemoteOptimizer  # noqa: E402

ADAM = {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}


def _model(weights=None) -> "keras.Model":
    # no keras.utils.set_random_seed: it imports TensorFlow where installed, which this process must not load
    # (tests/test_tensorflow.py runs TensorFlow in its own); every comparison starts from weights set explicitly
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
    if weights is not None:
        model.set_weights(weights)
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(320, 8)).astype(np.float32), rng.integers(0, 3, 320)


def _fit(model, optimizer) -> None:
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert model.jit_compile and not model.run_eagerly  # compiled: the exchange runs inside the jitted step


def test_compiled_fit_for_an_epoch_equals_local_keras_adam(client: Client, name: str) -> None:
    initial = _model().get_weights()
    local = _model(initial)
    _fit(local, keras.optimizers.Adam(**ADAM))
    remote = _model(initial)
    optimizer = RemoteOptimizer(client, name, ADAM)
    try:
        _fit(remote, optimizer)
        info = optimizer.remote.info()
        assert info.iterations == 10 and list(info.tensors) == ["0/kernel", "1/bias", "2/kernel", "3/bias"]
        for want, got, pulled in zip(local.get_weights(), remote.get_weights(), optimizer.remote.pull().values()):
            np.testing.assert_allclose(got, want, atol=1e-5)
            np.testing.assert_array_equal(got, pulled)  # the model holds exactly the server's weights
        assert max(np.abs(a - b).max() for a, b in zip(initial, remote.get_weights())) > 0.01  # it trained
    finally:
        client.delete_optimizer(name)


def test_second_worker_attaches_and_starts_from_the_servers_weights(client: Client, name: str) -> None:
    first = _model()
    try:
        _fit(first, RemoteOptimizer(client, name, ADAM, worker_id="a"))
        second = _model()
        _fit(second, RemoteOptimizer(client, name, ADAM, worker_id="b"))
        assert client.optimizer(name).info().iterations == 20
        for got, pulled in zip(second.get_weights(), client.optimizer(name).pull().values()):
            np.testing.assert_array_equal(got, pulled)
    finally:
        client.delete_optimizer(name)


def test_a_backend_other_than_jax_or_tensorflow_is_failed_precondition() -> None:
    """Keras's torch backend has no compiled step that can call the host: the constructor refuses, naming the field."""
    script = ("from optserve.client import OptserveError\n"
              "from optserve.keras import RemoteOptimizer\n"
              "try:\n"
              "    RemoteOptimizer('127.0.0.1:1', 'never-made')\n"
              "except OptserveError as err:\n"
              "    print(err.code().name, err.details())\n")
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("FAILED_PRECONDITION backend: optserve.keras runs on Keras's JAX or TensorFlow"), \
        run.stdout
    assert "'torch'" in run.stdout
