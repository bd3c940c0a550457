"""A sync Keras worker for tests/test_keras_state.py: 5 batches of its own data, then its statistics to a file."""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from optserve.keras import RemoteOptimizer  # noqa: E402

address, name, index, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, use_bias=False), keras.layers.BatchNormalization(),
                          keras.layers.Activation("tanh"), keras.layers.Dense(3)])
rng = np.random.default_rng(100 + index)
x, y = rng.normal(loc=index, size=(160, 8)).astype(np.float32), rng.integers(0, 3, 160)
model.compile(optimizer=RemoteOptimizer(address, name, {"learning_rate": 0.01}, model=model, worker_id=f"w{index}",
                                        mode="sync", num_workers=2),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
names = ["state/0/moving_mean", "state/1/moving_variance"]
np.savez(os.path.join(out, f"worker-{index}.npz"),
         **{n: np.asarray(v.value) for n, v in zip(names, model.non_trainable_variables)})
