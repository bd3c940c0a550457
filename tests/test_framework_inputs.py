"""The client takes what frameworks hand it: torch, JAX and NumPy arrays, their sparse types, and pytrees of them."""

import subprocess
import sys
from typing import NamedTuple

import grpc
import numpy as np
import pytest

from optserve.client import Client, IndexedSlices, InvalidArgumentError, OptserveError
from optserve.client.trees import flatten
from tests.conftest import stepped_weights

torch = pytest.importorskip("torch", reason="the torch extra (pip install '.[torch]') is not installed")

PARAMS = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "emb": np.ones((4, 2), np.float32)}
GRADS = {"w": np.full((2, 3), 0.25, np.float32), "emb": np.full((4, 2), -0.5, np.float32)}


class Layer(NamedTuple):
    kernel: object
    bias: object


@pytest.fixture
def opt(client: Client, name: str):
    """An optimizer of PARAMS, deleted after the test."""
    yield client.create_optimizer(name, PARAMS)
    client.delete_optimizer(name)


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_torch_parameters_requiring_grad_create_and_their_grads_push(client: Client, name: str) -> None:
    want = stepped_weights(client, name + "-np", PARAMS, GRADS)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in PARAMS.items()}
    for key, param in params.items():  # .grad of a real backward pass, a tensor that requires no grad
        (param * torch.from_numpy(GRADS[key])).sum().backward()
    assert all(p.requires_grad for p in params.values())
    _assert_same(stepped_weights(client, name, params, {k: p.grad for k, p in params.items()}), want)
    # a tensor that requires grad is sent as a gradient too (detached)
    requiring = {k: torch.from_numpy(v).requires_grad_() for k, v in GRADS.items()}
    _assert_same(stepped_weights(client, name, params, requiring), want)


def test_torch_sparse_embedding_gradient_is_sparse(client: Client, name: str) -> None:
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    embedding(torch.tensor([1, 3, 1])).sum().backward()  # rows 1 (twice) and 3
    grad = embedding.weight.grad
    assert grad.layout == torch.sparse_coo
    want = stepped_weights(client, name + "-own", PARAMS,
                    {"w": GRADS["w"], "emb": IndexedSlices(np.array([1, 3]), np.array([[2, 2], [1, 1]], np.float32))})
    got = stepped_weights(client, name, PARAMS, {"w": GRADS["w"], "emb": grad})
    _assert_same(got, want)
    assert got["emb"][0].tolist() == PARAMS["emb"][0].tolist()  # row 0 untouched: sent as rows, not dense


def test_jax_arrays_push_dense(client: Client, name: str) -> None:
    jnp = pytest.importorskip("jax.numpy")
    want = stepped_weights(client, name + "-np", PARAMS, GRADS)
    _assert_same(stepped_weights(client, name, {k: jnp.asarray(v) for k, v in PARAMS.items()},
                          {k: jnp.asarray(v) for k, v in GRADS.items()}), want)


def test_nested_tree_names_are_its_paths(client: Client, name: str) -> None:
    tree = {"params": {"Dense_0": Layer(np.zeros((2, 3), np.float32), np.zeros(3, np.float32))},
            "blocks": [{"w": np.ones(2, np.float32)}, (np.full(1, 2.0, np.float32),)]}
    assert list(flatten(tree, "params")) == ["params/Dense_0/kernel", "params/Dense_0/bias", "blocks/0/w", "blocks/1/0"]
    opt = client.create_optimizer(name, tree, {"learning_rate": 0.1})
    try:
        assert list(opt.info().tensors) == ["params/Dense_0/kernel", "params/Dense_0/bias", "blocks/0/w", "blocks/1/0"]
        grads = {"blocks": [{"w": np.ones(2)}, (np.ones(1),)],  # key order differs: names do not
                 "params": {"Dense_0": Layer(np.ones((2, 3)), np.ones(3))}}
        version = opt.push(grads)
        pulled = opt.pull(like=tree)
        assert isinstance(pulled["params"]["Dense_0"], Layer) and isinstance(pulled["blocks"], list)
        assert isinstance(pulled["blocks"][1], tuple)
        flat = opt.pull()
        assert flat.version == version == 1
        np.testing.assert_array_equal(pulled["params"]["Dense_0"].kernel, flat["params/Dense_0/kernel"])
        np.testing.assert_array_equal(pulled["blocks"][0]["w"], flat["blocks/0/w"])
        sub = opt.pull(like={"blocks": [{"w": None}]})  # a subtree pulls just its tensors
        np.testing.assert_array_equal(sub["blocks"][0]["w"], flat["blocks/0/w"])
    finally:
        client.delete_optimizer(name)


def test_pull_like_returns_callers_array_types(opt) -> None:
    jnp = pytest.importorskip("jax.numpy")
    like = {"w": torch.zeros((2, 3), dtype=torch.float64), "emb": jnp.zeros((4, 2), jnp.float32)}
    pulled = opt.pull(like=like)
    assert isinstance(pulled["w"], torch.Tensor) and pulled["w"].dtype == torch.float64
    assert type(pulled["emb"]).__module__.split(".")[0] in ("jax", "jaxlib") and pulled["emb"].dtype == jnp.float32
    np.testing.assert_array_equal(pulled["w"].numpy(), PARAMS["w"])
    np.testing.assert_array_equal(np.asarray(pulled["emb"]), PARAMS["emb"])


def test_torch_module_round_trip_through_named_parameters(client: Client, name: str) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    opt = client.create_optimizer(name, dict(module.named_parameters()), {"learning_rate": 0.1})
    try:
        assert list(opt.info().tensors) == ["0.weight", "0.bias", "2.weight", "2.bias"]
        module(torch.ones(4, 3)).sum().backward()
        opt.push({n: p.grad for n, p in module.named_parameters()})
        pulled = opt.pull(like=dict(module.named_parameters()))
        assert all(isinstance(t, torch.Tensor) and not t.requires_grad for t in pulled.values())
        module.load_state_dict(pulled)
        for key, value in opt.pull().items():
            np.testing.assert_array_equal(module.state_dict()[key].numpy(), value)
    finally:
        client.delete_optimizer(name)


@pytest.mark.parametrize("call,fragment", [
    (lambda opt: opt.push({"w": GRADS["w"], "emb": None}),
     "gradients['emb']: is None (no gradient); push with missing='skip'"),
    (lambda opt: opt.push(np.zeros(3)), "gradients: must be a dict, list, tuple or NamedTuple"),
    (lambda opt: opt.push({"w": GRADS["w"], "emb": {"x": GRADS["emb"], ("a",): 1}}), "key ('a',) under 'emb'"),
    (lambda opt: opt.push({"w/0": GRADS["w"], "w": [GRADS["emb"]]}), "two tensors have the path 'w/0'"),
    (lambda opt: opt.pull(like={"w": np.zeros((2, 3)), "emb": np.zeros((2, 4))}), "like['emb']: has shape (2, 4)"),
    (lambda opt: opt.pull(like={"w": np.zeros((2, 3))}, names=["w"]), "names: give names or like"),
    (lambda opt: opt.client.create_optimizer(opt.name + "x", {"a": {"b": 1.0}, "a/b": 2.0}),
     "two tensors have the path 'a/b'"),
], ids=["None gradient", "lone array", "tuple key", "path collision", "like shape", "like and names",
        "create path collision"])
def test_tree_refusals_are_invalid_argument(client: Client, opt, call, fragment) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        call(opt)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and isinstance(caught.value, ValueError)
    assert fragment in caught.value.details(), caught.value.details()
    assert opt.info().version == 0
    assert [o.name for o in client.list_optimizers()].count(opt.name + "x") == 0


def test_pull_like_naming_an_unknown_path_is_not_found(opt) -> None:
    with pytest.raises(OptserveError) as caught:
        opt.pull(like={"w": np.zeros((2, 3)), "layers": [np.zeros(2)]})
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'layers/0'" in caught.value.details()


def test_symbolic_values_are_refused_naming_the_tensor(opt) -> None:
    jax = pytest.importorskip("jax")

    def traced(w):
        opt.push({"w": w, "emb": GRADS["emb"]})
        return w

    with pytest.raises(InvalidArgumentError, match=r"gradients\['w'\]: cannot be read"):
        jax.jit(traced)(GRADS["w"])
    assert opt.info().version == 0


def test_plain_client_imports_no_framework(client: Client, name: str) -> None:
    client.create_optimizer(name, PARAMS)
    script = ("import sys, numpy as np\n"
              "from optserve.client import Client, IndexedSlices\n"
              "opt = Client(sys.argv[1], timeout=60).optimizer(sys.argv[2])\n"
              "opt.push({'w': np.ones((2, 3)), 'emb': IndexedSlices([0], np.ones((1, 2)))})\n"
              "opt.pull(like={'w': np.zeros((2, 3)), 'emb': [0.0] and np.zeros((4, 2))})\n"
              "loaded = sorted(m for m in ('torch', 'jax', 'tensorflow', 'keras') if m in sys.modules)\n"
              "print('loaded', loaded)\n")
    try:
        run = subprocess.run([sys.executable, "-c", script, client.address, name], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "loaded []" in run.stdout
    finally:
        client.delete_optimizer(name)


def test_none_leaf_with_missing_skip_leaves_that_tensor(client: Client, name: str) -> None:
    tree = {"dense": {"w": PARAMS["w"], "b": np.zeros(3, np.float32)}, "emb": PARAMS["emb"]}
    opt = client.create_optimizer(name, tree)
    try:
        version = opt.push({"dense": {"w": GRADS["w"], "b": None}, "emb": GRADS["emb"]}, missing="skip")
        pulled = opt.pull()
        assert version == pulled.version == 1
        assert not pulled["dense/b"].any() and not np.array_equal(pulled["dense/w"], PARAMS["w"])
    finally:
        client.delete_optimizer(name)
