"""optserve.torch.RemoteOptimizer: a real torch.optim.Optimizer whose step runs on the server."""

import grpc
import numpy as np
import pytest

from optserve.client import Client, InvalidArgumentError, OptserveError
from tests.conftest import run_threads, serving

torch = pytest.importorskip("torch", reason="the torch extra (pip install '.[torch]') is not installed")
from optserve.torch import RemoteOptimizer  # noqa: E402  (needs torch)

ADAM = {"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-4}  # an epsilon whose placement shows


def _model(seed: int = 0) -> "torch.nn.Module":
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batches(count: int, seed: int = 1) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
            for _ in range(count)]


def _train(model, opt, batches, use_async: bool = False) -> None:
    loss_fn = torch.nn.CrossEntropyLoss()
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if use_async:
            opt.step_async()
        else:
            opt.step()
    if use_async:
        opt.synchronize()


def _max_difference(a, b) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters()))


def test_fifty_steps_equal_local_torch_adam(client: Client, name: str) -> None:
    batches = _batches(50)
    local_model = _model()
    _train(local_model, torch.optim.Adam(local_model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-4), batches)
    runs = {}
    for adaptive in (True, False):
        remote_model = _model()
        opt = RemoteOptimizer(remote_model, client, f"{name}-{adaptive}", {**ADAM, "adaptive_epsilon": adaptive})
        try:
            assert isinstance(opt, torch.optim.Optimizer)
            _train(remote_model, opt, batches)
            assert opt.remote.info().iterations == 50
        finally:
            opt.close()
            client.delete_optimizer(f"{name}-{adaptive}")
        runs[adaptive] = remote_model
    for (key, want), got in zip(local_model.state_dict().items(), runs[True].state_dict().values()):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5, err_msg=key)  # measured: 1.2e-6
    assert _max_difference(_model(), runs[True]) > 0.05  # it trained: not two untouched models compared
    assert _max_difference(local_model, runs[False]) > 1e-3  # Keras's own epsilon placement is another trajectory


def test_step_async_overlaps_and_lands_the_same_weights_as_the_server(client: Client, name: str) -> None:
    model = _model()
    opt = RemoteOptimizer(model, client, name, ADAM)
    try:
        loss_fn = torch.nn.CrossEntropyLoss()
        futures = []
        for x, y in _batches(5):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            futures.append(opt.step_async())
        opt.synchronize()
        assert [int(f.result()) for f in futures] == [1, 2, 3, 4, 5]
        for key, value in opt.remote.pull().items():
            np.testing.assert_array_equal(dict(model.named_parameters())[key].detach().numpy(), value)
    finally:
        opt.close()
        client.delete_optimizer(name)


def test_first_worker_creates_the_others_attach_and_start_from_its_weights(server, client: Client, name: str) -> None:
    first, second = _model(0), _model(7)
    opt1 = RemoteOptimizer(first, client, name, ADAM)
    opt2 = RemoteOptimizer(second, server.address, name, ADAM)  # an address: it makes its own client
    try:
        for a, b in zip(first.parameters(), second.parameters()):
            assert torch.equal(a, b)
        _train(first, opt1, _batches(2))
        _train(second, opt2, _batches(1, seed=3))
        assert opt1.remote.info().iterations == 3
        with pytest.raises(OptserveError) as caught:
            RemoteOptimizer(_model(), client, name, {**ADAM, "learning_rate": 0.5})
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS and "learning_rate" in caught.value.details()
        with pytest.raises(OptserveError) as caught:
            RemoteOptimizer(torch.nn.Linear(8, 4), client, name, ADAM)
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    finally:
        opt1.close()
        opt2.close()
        client.delete_optimizer(name)


def _sync_models(address: str, name: str, make_model, seed: int) -> list:
    """Two sync workers in threads, 3 steps each on their own batches; their models (or what each raised)."""
    results: list = [None, None]

    def worker(index: int) -> None:
        with Client(address, timeout=60) as mine:
            model = make_model()
            opt = RemoteOptimizer(model, mine, name, ADAM, mode="sync", num_workers=2)
            try:
                _train(model, opt, _batches(3, seed=seed + index))
                results[index] = model
            except Exception as err:  # reported by the caller
                results[index] = err
            finally:
                opt.close()

    run_threads(worker, 2)
    assert all(isinstance(r, torch.nn.Module) for r in results), results
    return results


def test_two_sync_workers_in_threads_take_one_step_per_round(server, name: str) -> None:
    models = _sync_models(server.address, name, _model, 10)
    results = {index: [p.detach().clone() for p in model.parameters()] for index, model in enumerate(models)}
    with Client(server.address) as client:
        try:
            assert client.optimizer(name).info().iterations == 3
            for a, b in zip(results[0], results[1]):
                assert torch.equal(a, b)  # both workers end on the weights of the last round
        finally:
            client.delete_optimizer(name)


def test_state_dict_resumes_the_worker_and_its_seq(client: Client, name: str) -> None:
    model = _model()
    opt = RemoteOptimizer(model, client, name, ADAM, worker_id="w0")
    try:
        _train(model, opt, _batches(2))
        saved = opt.state_dict()
        assert saved["optserve"]["next_seq"] == 2 and saved["optserve"]["worker_id"] == "w0"
        opt.close()
        fresh = _model(5)
        opt = RemoteOptimizer(fresh, client, name, ADAM)
        opt.load_state_dict(saved)
        assert opt.worker_id == "w0"
        _train(fresh, opt, _batches(1))
        assert opt.remote.info().iterations == 3  # seq 2: a new push, not a duplicate of an old one
        with pytest.raises(InvalidArgumentError, match="state_dict: not one of"):
            opt.load_state_dict(torch.optim.SGD(fresh.parameters(), lr=0.1).state_dict())
    finally:
        opt.close()
        client.delete_optimizer(name)


def test_refusals_name_the_argument(client: Client, name: str) -> None:
    model = _model()
    with pytest.raises(InvalidArgumentError, match=r"param_groups\[0\]\['lr'\]"):
        RemoteOptimizer([{"params": model.parameters(), "lr": 0.1}], client, name)
    with pytest.raises(InvalidArgumentError, match="params: no parameters"):
        RemoteOptimizer([], client, name)
    weight = model[0].weight
    with pytest.raises(InvalidArgumentError, match="appears twice"):
        RemoteOptimizer([("a", weight), ("b", weight)], client, name)
    with pytest.raises(InvalidArgumentError, match="params: .*non-leaf"):
        RemoteOptimizer([("doubled", weight * 2)], client, name)
    assert name not in [o.name for o in client.list_optimizers()]
    opt = RemoteOptimizer(model, client, name, ADAM)
    try:
        with pytest.raises(InvalidArgumentError, match="no parameter has a .grad"):
            opt.step()
        with pytest.raises(InvalidArgumentError, match="param_group: the optimizer's tensors are fixed"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        assert opt.remote.info().version == 0
    finally:
        opt.close()
        client.delete_optimizer(name)


def test_parameter_without_grad_is_skipped_as_keras_skips_it(client: Client, name: str) -> None:
    model = _model()
    unused = torch.nn.Linear(2, 2)  # in the optimizer, never in the loss: its .grad stays None
    params = list(model.named_parameters()) + [("unused." + n, p) for n, p in unused.named_parameters()]
    before = {n: p.detach().clone() for n, p in params}
    opt = RemoteOptimizer(params, client, name, ADAM)
    try:
        _train(model, opt, _batches(2))
        assert opt.remote.info().iterations == 2
        for key in ("unused.weight", "unused.bias"):
            assert torch.equal(dict(params)[key], before[key])
            assert not opt.remote.pull_slot("m", names=[key])[key].any()
        assert not torch.equal(dict(params)["0.weight"], before["0.weight"])
    finally:
        opt.close()
        client.delete_optimizer(name)


def _bn_model(seed: int = 0) -> "torch.nn.Module":
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


@pytest.mark.parametrize("use_async", [False, True], ids=["step", "step_async"])
def test_batchnorm_buffers_live_on_the_server_and_lose_no_update(client: Client, name: str, use_async: bool) -> None:
    batches = _batches(5)
    local = _bn_model()
    _train(local, torch.optim.Adam(local.parameters(), lr=0.01, eps=1e-4), batches)
    model = _bn_model()
    opt = RemoteOptimizer(model, client, name, {**ADAM, "adaptive_epsilon": True})
    try:
        assert opt.remote.info().non_trainable == ("1.running_mean", "1.running_var", "1.num_batches_tracked")
        _train(model, opt, batches, use_async=use_async)
        served = opt.remote.pull()
        for key, buffer in model.named_buffers():
            np.testing.assert_array_equal(served[key], buffer.numpy().astype(np.float32), err_msg=key)
        assert int(model[1].num_batches_tracked) == 5  # every forward pass counted, none overwritten
        if not use_async:  # step: the same trajectory as local torch, buffers included
            for (key, want), got in zip(local.state_dict().items(), model.state_dict().values()):
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5, err_msg=key)
    finally:
        opt.close()
        client.delete_optimizer(name)


def test_sync_workers_share_the_rounds_mean_of_their_buffers(server, name: str) -> None:
    models = _sync_models(server.address, name, _bn_model, 20)
    results = {index: {k: b.clone() for k, b in model.named_buffers()} for index, model in enumerate(models)}
    with Client(server.address) as client:
        try:
            served = client.optimizer(name).pull()
            for key in results[0]:
                assert torch.equal(results[0][key], results[1][key]), key
                np.testing.assert_array_equal(served[key], results[0][key].numpy().astype(np.float32))
            assert not torch.equal(results[0]["1.running_mean"], torch.zeros(16))
        finally:
            client.delete_optimizer(name)


def test_a_failed_push_raises_from_step_and_leaves_the_parameters(client: Client, name: str) -> None:
    model = _model()
    opt = RemoteOptimizer(model, client, name, ADAM)
    try:
        _train(model, opt, _batches(1))
        before = [p.detach().clone() for p in model.parameters()]
        client.delete_optimizer(name)  # the server loses it while the worker trains
        loss_fn = torch.nn.CrossEntropyLoss()
        x, y = _batches(1, seed=9)[0]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        future = opt.step_async()
        with pytest.raises(OptserveError) as caught:
            opt.synchronize()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and future.exception() is caught.value
        with pytest.raises(OptserveError):
            opt.step()
        for a, b in zip(before, model.parameters()):
            assert torch.equal(a, b)
        opt.synchronize()  # nothing in flight any more: returns
    finally:
        opt.close()
    with pytest.raises(OptserveError) as caught:
        client.optimizer(name)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_worker_without_a_token_is_refused(name: str, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    for running in serving(token_file=str(tokens)):
        with Client(running.address, token="wrong") as stranger:
            with pytest.raises(OptserveError) as caught:
                RemoteOptimizer(_model(), stranger, name, ADAM)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(running.address, token="s3cret") as member:
            opt = RemoteOptimizer(_model(), member, name, ADAM)
            opt.close()
            assert [o.name for o in member.list_optimizers()] == [name]
