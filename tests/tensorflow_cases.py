"""TensorFlow: optserve.keras on its Keras 3 backend and optserve.tf_keras equal local Adam; the client takes its arrays.

Not collected by the suite (which loads Keras on JAX): tests/test_tensorflow.py runs
this module in one subprocess with KERAS_BACKEND=tensorflow, so TensorFlow's
backend is chosen before Keras loads and the process pays its import once.
"""

import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") != "tensorflow":
    pytest.skip("run by tests/test_tensorflow.py with KERAS_BACKEND=tensorflow", allow_module_level=True)
tf = pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
tf_keras = pytest.importorskip("tf_keras", reason="tf-keras is not installed (pip install --no-deps tf-keras)")
import keras  # noqa: E402

import optserve.keras  # noqa: E402
import optserve.tf_keras  # noqa: E402
from optserve.client import Client, IndexedSlices  # noqa: E402
from tests.conftest import stepped_weights  # noqa: E402
from tests.test_framework_inputs import GRADS, PARAMS, _assert_same  # noqa: E402

ADAM = {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
TENSORS = ["0/kernel", "1/bias", "2/kernel", "3/bias"]
BOTH_KERASES = pytest.mark.parametrize("kit,adapter", [(keras, optserve.keras), (tf_keras, optserve.tf_keras)],
                                       ids=["keras3-tensorflow", "tf-keras"])


def _data(features: int = 8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(320, features)).astype(np.float32), rng.integers(0, 3, 320)


def _dense(kit, weights=None):
    """The test's model in Keras 3 (`kit` keras) or Keras 2 (`kit` tf_keras), from `weights` when given."""
    kit.utils.set_random_seed(0)
    model = kit.Sequential([kit.Input((8,)), kit.layers.Dense(16, activation="tanh"), kit.layers.Dense(3)])
    if weights is not None:
        model.set_weights(weights)
    return model


def _fit(kit, model, optimizer, x=None, y=None) -> None:
    """One epoch of 10 batches of compiled (tf.function, not XLA) model.fit."""
    model.compile(optimizer=optimizer, loss=kit.losses.SparseCategoricalCrossentropy(from_logits=True))
    if x is None:
        x, y = _data()
    model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    assert not model.run_eagerly and not model.jit_compile  # a tf.function step, py_function inside


def _assert_trained_like(local, remote, initial, optimizer) -> None:
    """The remote model equals the local one within 1e-5, holds exactly the server's weights, and moved."""
    for want, got, pulled in zip(local.get_weights(), remote.get_weights(), optimizer.remote.pull().values()):
        np.testing.assert_allclose(got, want, atol=1e-5)
        np.testing.assert_array_equal(got, pulled)
    assert max(np.abs(a - b).max() for a, b in zip(initial, remote.get_weights())) > 0.01


@BOTH_KERASES
def test_compiled_fit_for_an_epoch_equals_local_adam(client: Client, name: str, kit, adapter) -> None:
    assert keras.backend.backend() == "tensorflow"
    initial = _dense(kit).get_weights()
    local = _dense(kit, initial)
    _fit(kit, local, kit.optimizers.Adam(**ADAM))
    remote = _dense(kit, initial)
    optimizer = adapter.RemoteOptimizer(client, name, ADAM)
    try:
        _fit(kit, remote, optimizer)
        info = optimizer.remote.info()
        assert info.iterations == 10 and list(info.tensors) == TENSORS
        assert int(optimizer.iterations.numpy()) == 10
        assert optimizer.get_config()["remote_name"] == name and optimizer.get_config()["name"] == "optserve"
        _assert_trained_like(local, remote, initial, optimizer)
    finally:
        client.delete_optimizer(name)


@BOTH_KERASES
def test_second_worker_attaches_and_starts_from_the_servers_weights(client: Client, name: str, kit,
                                                                    adapter) -> None:
    try:
        _fit(kit, _dense(kit), adapter.RemoteOptimizer(client, name, ADAM, worker_id="a"))
        after_first = [w.copy() for w in client.optimizer(name).pull().values()]
        second = _dense(kit)
        second_optimizer = adapter.RemoteOptimizer(client, name, ADAM, worker_id="b")
        second.compile(optimizer=second_optimizer, loss=kit.losses.SparseCategoricalCrossentropy(from_logits=True))
        second_optimizer.build(second.trainable_variables)
        for got, want in zip(second.get_weights(), after_first):
            np.testing.assert_array_equal(got, want)  # attached: it starts from the first worker's result
        _fit(kit, second, second_optimizer)
        assert client.optimizer(name).info().iterations == 20
        for got, pulled in zip(second.get_weights(), client.optimizer(name).pull().values()):
            np.testing.assert_array_equal(got, pulled)
    finally:
        client.delete_optimizer(name)


@BOTH_KERASES
def test_batchnorm_statistics_live_on_the_server_with_local_adams_numbers(client: Client, name: str, kit,
                                                                          adapter) -> None:
    def model(weights=None):
        kit.utils.set_random_seed(0)
        net = kit.Sequential([kit.Input((8,)), kit.layers.Dense(16, use_bias=False), kit.layers.BatchNormalization(),
                              kit.layers.Activation("tanh"), kit.layers.Dense(3)])
        if weights is not None:
            net.set_weights(weights)
        return net

    initial = model().get_weights()
    local = model(initial)
    _fit(kit, local, kit.optimizers.Adam(**ADAM))
    remote = model(initial)
    optimizer = adapter.RemoteOptimizer(client, name, ADAM, model=remote)
    try:
        _fit(kit, remote, optimizer)
        pulled = optimizer.remote.pull()
        state = [n for n in pulled.keys() if n.startswith("state/")]
        assert state == ["state/0/moving_mean", "state/1/moving_variance"]
        for want, got in zip(local.get_weights(), remote.get_weights()):  # the moving statistics included
            np.testing.assert_allclose(got, want, atol=1e-5)
        for state_name, variable in zip(state, remote.non_trainable_variables):
            np.testing.assert_array_equal(np.asarray(variable.numpy()), pulled[state_name])
        assert np.abs(remote.non_trainable_variables[0].numpy()).max() > 1e-3  # the statistics moved
    finally:
        client.delete_optimizer(name)


def _rows(repeated: bool) -> tuple[np.ndarray, np.ndarray]:
    """10 batches of 32 samples of 4 embedding rows out of rows 0..159 (each row once per batch unless `repeated`)."""
    rng = np.random.default_rng(1)
    if repeated:
        x = rng.integers(0, 20, (320, 4))
    else:
        x = np.concatenate([rng.permutation(160)[:128].reshape(32, 4) for _ in range(10)])
    return x.astype(np.int32), rng.integers(0, 3, 320)


@pytest.mark.parametrize("kit,adapter,repeated", [(keras, optserve.keras, False), (tf_keras, optserve.tf_keras, False),
                                                  (tf_keras, optserve.tf_keras, True)],
                         ids=["keras3-tensorflow", "tf-keras", "tf-keras-repeated-rows"])
def test_embedding_gradients_travel_as_indexed_slices_with_local_adams_numbers(client: Client, name: str, kit,
                                                                               adapter, repeated: bool) -> None:
    """An Embedding's gradient is a tf.IndexedSlices: pushed as rows, it gives local Adam's numbers.

    Keras 3's own Adam on TensorFlow squares each slice before summing a row
    looked up twice in a batch (tf-keras, Keras on JAX and the server sum first),
    so Keras 3 is compared on batches that look each row up once.
    """
    def model(weights=None):
        kit.utils.set_random_seed(0)
        net = kit.Sequential([kit.Input((4,), dtype="int32"), kit.layers.Embedding(200, 6),
                              kit.layers.Flatten(), kit.layers.Dense(3)])
        if weights is not None:
            net.set_weights(weights)
        return net

    x, y = _rows(repeated)
    initial = model().get_weights()
    local = model(initial)
    _fit(kit, local, kit.optimizers.Adam(**ADAM), x, y)
    remote = model(initial)
    optimizer = adapter.RemoteOptimizer(client, name, ADAM)
    seen = []
    exchange = optimizer._worker.exchange  # the real exchange, recording what type of gradient reached the host
    optimizer._worker.exchange = lambda names, grads, *rest: seen.append(type(grads[0]).__name__) or exchange(
        names, grads, *rest)
    try:
        _fit(kit, remote, optimizer, x, y)
        assert seen == ["IndexedSlices"] * 10  # the embedding's gradient reached the client sparse
        _assert_trained_like(local, remote, initial, optimizer)
        np.testing.assert_array_equal(remote.get_weights()[0][160:], initial[0][160:])  # rows never looked up
    finally:
        client.delete_optimizer(name)


def test_tensorflow_tensors_push_dense(client: Client, name: str) -> None:
    want = stepped_weights(client, name + "-np", PARAMS, GRADS)
    _assert_same(stepped_weights(client, name, {k: tf.Variable(v) for k, v in PARAMS.items()},
                          {k: tf.constant(v) for k, v in GRADS.items()}), want)


def test_tensorflow_indexed_slices_push_sparse(client: Client, name: str) -> None:
    embedding = tf.Variable(PARAMS["emb"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(embedding, [1, 3, 1]))  # rows 1 (twice) and 3
    grad = tape.gradient(loss, embedding)
    assert isinstance(grad, tf.IndexedSlices)
    want = stepped_weights(client, name + "-own", PARAMS,
                    {"w": GRADS["w"], "emb": IndexedSlices(np.array([1, 3]), np.array([[2, 2], [1, 1]], np.float32))})
    got = stepped_weights(client, name, PARAMS, {"w": GRADS["w"], "emb": grad})
    _assert_same(got, want)
    assert got["emb"][0].tolist() == PARAMS["emb"][0].tolist()  # row 0 untouched: sent as rows, not dense
