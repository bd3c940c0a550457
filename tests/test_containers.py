"""The images of docker/, built and run with podman: health, pushes, SIGKILL, SIGTERM, non-root, read-only.

Runs only with `--containers` (`make test-containers`, as root): it builds a local Debian
base (kept between runs), the server and worker images on it, and runs them with published
ports on 127.0.0.1 only. Everything else it makes is removed at the end, and every wait is
bounded. `make test` skips it: it needs neither root nor podman.
"""

import inspect
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from optserve.client import Client
from tests.podman import (
    RUN_LABEL, Unavailable, build, check_prerequisites, image_size, new_run_id, podman, remove_everything_labelled,
    ulimits,
)

DATA_DIR = "/var/lib/optserve"  # the image's --data-dir and VOLUME
USER = "10001"  # the images' USER
SHAPES = {"dense/kernel": (64, 32), "dense/bias": (32,), "embedding": (100, 16)}
CONFIG = {"learning_rate": 0.01, "beta_1": 0.8, "amsgrad": True}
CONTAINER_PUSHES = 5  # from the worker container, before the SIGKILL run
HOST_PUSHES = 30  # from the host, through a SIGKILL and a new container
KILL_AFTER = 8  # acknowledged host pushes before the SIGKILL


def gradients(worker: str, seq: int) -> dict:
    """Push SEQ of WORKER: exact integers over 1000 in float32, the same bits under any NumPy."""
    import numpy as np  # also runs alone in the worker container (inspect.getsource below)

    shapes = {"dense/kernel": (64, 32), "dense/bias": (32,), "embedding": (100, 16)}
    salt = sum(map(ord, worker))
    return {name: (((np.arange(int(np.prod(shape))) * 7919 + seq * 104729 + salt) % 2001 - 1000)
                   .astype(np.float32).reshape(shape) / np.float32(1000))
            for name, shape in shapes.items()}


# Run by the worker image (no JAX, just the client): pushes 1..COUNT of WORKER with worker ids.
WORKER_SCRIPT = inspect.getsource(gradients) + """
import json, sys
from optserve.client import Client
address, name, worker, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with Client(address, timeout=120) as client:
    optimizer = client.optimizer(name)
    results = [optimizer.push(gradients(worker, seq), worker_id=worker, seq=seq) for seq in range(1, count + 1)]
print(json.dumps([[int(r), r.duplicate] for r in results]))
"""


def initial_params() -> dict[str, np.ndarray]:
    return {name: np.full(shape, 0.5, np.float32) for name, shape in SHAPES.items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_id(request: pytest.FixtureRequest) -> Iterator[str]:
    """This run's label value; at the end every container, volume and image carrying it is removed."""
    if not request.config.getoption("--containers"):
        pytest.skip("builds and runs the images with podman as root: run `make test-containers`")
    try:
        check_prerequisites()
    except Unavailable as why:
        pytest.fail(f"the container tests cannot run here: {why}")
    value = new_run_id()
    yield value
    left = remove_everything_labelled(value)
    assert not left, f"could not remove {left} (label {RUN_LABEL}={value})"


@pytest.fixture(scope="module")
def images(run_id: str) -> dict[str, str]:
    """The server and worker images, built from this tree on the local base."""
    built = {}
    for dockerfile, tag in (("Dockerfile", f"localhost/optserve-test:cpu-{run_id}"),
                            ("Dockerfile.worker", f"localhost/optserve-test-worker:{run_id}")):
        started = time.monotonic()
        built[dockerfile] = build(dockerfile, tag, run_id)
        print(f"{dockerfile}: built in {time.monotonic() - started:.0f} s, {image_size(tag) / 1e6:.0f} MB")
    return built


class ServerContainer:
    """A server container on a named volume, its gRPC and bulk ports published on 127.0.0.1."""

    def __init__(self, image: str, run_id: str, volume: str, port: int, bulk_port: int):
        self.name = f"optserve-test-{new_run_id()}"
        self.address = f"127.0.0.1:{port}"
        # The bulk port is the same inside and out: clients dial the gRPC host at the port the server names.
        podman("run", "-d", "--name", self.name, "--label", f"{RUN_LABEL}={run_id}", *ulimits(), "--read-only",
               "-p", f"127.0.0.1:{port}:50051", "-p", f"127.0.0.1:{bulk_port}:{bulk_port}",
               "-v", f"{volume}:{DATA_DIR}", image, "--bulk-port", str(bulk_port), timeout=120)

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name, timeout=60).stdout)

    def logs(self) -> str:
        run = podman("logs", self.name, timeout=60, check=False)
        return (run.stdout + run.stderr)[-4000:]

    def wait_healthy(self, timeout: float = 240) -> None:
        """Runs the image's own HEALTHCHECK until it passes (no systemd here runs its timer)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.state()["Running"], f"{self.name} exited:\n{self.logs()}"
            check = podman("healthcheck", "run", self.name, timeout=60, check=False)
            if check.returncode == 0:
                return
            assert time.monotonic() < deadline, f"{self.name} not healthy after {timeout} s: {check.stdout}" \
                                                f"{check.stderr}\n{self.logs()}"
            time.sleep(2)

    def wait_exited(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (state := self.state())["Running"]:
            assert time.monotonic() < deadline, f"{self.name} still running after {timeout} s"
            time.sleep(0.5)
        return state


@pytest.fixture(scope="module")
def volume(run_id: str) -> str:
    name = f"optserve-test-{run_id}"
    podman("volume", "create", "--label", f"{RUN_LABEL}={run_id}", name, timeout=60)
    return name


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def first_server(images, run_id, volume, ports) -> ServerContainer:
    server = ServerContainer(images["Dockerfile"], run_id, volume, *ports)
    server.wait_healthy()
    return server


# -------------------------------------------------------------------------------- tests


def test_the_server_image_keeps_its_healthcheck_and_runs_as_its_user_on_a_read_only_root(first_server) -> None:
    config = json.loads(podman("inspect", "--format", "{{json .Config}}", first_server.name, timeout=60).stdout)
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "optserve", "health"], config.get("Healthcheck")
    assert config["User"] == f"{USER}:{USER}"
    host_config = json.loads(podman("inspect", "--format", "{{json .HostConfig}}", first_server.name,
                                    timeout=60).stdout)
    assert host_config["ReadonlyRootfs"] is True
    ids = podman("exec", first_server.name, "sh", "-c", "id -u; id -g", timeout=60).stdout.split()
    assert ids == [USER, USER]
    top = podman("top", first_server.name, "user", "args", timeout=60).stdout
    serving = [line for line in top.splitlines() if "optserve serve" in line]
    assert serving and all(line.split()[0] in (USER, "optserve") for line in serving), top
    for path in ("/opt/venv/written-by-test", "/home/optserve/written-by-test"):
        touch = podman("exec", first_server.name, "touch", path, timeout=60, check=False)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr, (path, touch.stderr)
    # The one place it writes: the volume, the image's data dir.
    podman("exec", first_server.name, "sh", "-c", f"touch {DATA_DIR}/.probe && rm {DATA_DIR}/.probe", timeout=60)


def test_every_acknowledged_push_survives_sigkill_exactly_once_and_sigterm_checkpoints(
        images, run_id, volume, ports, first_server) -> None:
    address = first_server.address
    with Client(address, timeout=120) as client:
        client.create_optimizer("killed", initial_params(), CONFIG)

    # Pushes from a worker container (the worker image, on the host's network to reach 127.0.0.1).
    worker = podman("run", "--rm", "--network", "host", "--read-only", "--label", f"{RUN_LABEL}={run_id}",
                    *ulimits(), images["Dockerfile.worker"], "python", "-c", WORKER_SCRIPT, address, "killed",
                    "container", str(CONTAINER_PUSHES), timeout=300)
    assert json.loads(worker.stdout.splitlines()[-1]) == [[seq, False] for seq in range(1, CONTAINER_PUSHES + 1)]

    # Pushes from the host, with a SIGKILL of the server part way: the client's retries reach the new container.
    acknowledged, failures = [], []

    def push_from_host() -> None:
        try:
            with Client(address, timeout=240) as pusher:
                optimizer = pusher.optimizer("killed")
                for seq in range(1, HOST_PUSHES + 1):
                    acknowledged.append(optimizer.push(gradients("host", seq), worker_id="host", seq=seq))
        except Exception as err:  # reported below, with what was acknowledged
            failures.append(err)

    pusher = threading.Thread(target=push_from_host, daemon=True)
    pusher.start()
    deadline = time.monotonic() + 180
    while len(acknowledged) < KILL_AFTER and not failures:
        assert time.monotonic() < deadline, f"only {len(acknowledged)} pushes acknowledged in 180 s"
        time.sleep(0.01)
    podman("kill", "--signal", "KILL", first_server.name, timeout=60)
    killed = first_server.wait_exited(timeout=60)
    assert killed["ExitCode"] == 137, killed
    assert len(acknowledged) < HOST_PUSHES, "the run ended before the SIGKILL: nothing was cut"
    second = ServerContainer(images["Dockerfile"], run_id, volume, *ports)
    second.wait_healthy()
    pusher.join(timeout=300)
    assert not pusher.is_alive(), f"host pushes still running 300 s after the restart ({len(acknowledged)} done)"
    assert not failures, f"after {len(acknowledged)} acknowledged pushes: {failures[0]!r}\n{second.logs()}"

    # Exactly once: one step per push, in order, whatever the SIGKILL cut.
    versions = [int(result) for result in acknowledged]
    assert versions == list(range(CONTAINER_PUSHES + 1, CONTAINER_PUSHES + HOST_PUSHES + 1))
    with Client(address, timeout=120) as client:
        optimizer = client.optimizer("killed")
        for seq in (1, KILL_AFTER, HOST_PUSHES):  # retries of acknowledged pushes: answered, never applied again
            retry = optimizer.push(gradients("host", seq), worker_id="host", seq=seq)
            assert retry.duplicate and int(retry) == versions[seq - 1]
        info = optimizer.info()
        assert info.version == info.iterations == CONTAINER_PUSHES + HOST_PUSHES

        # The reference: the same pushes, once each, in the same image, never interrupted.
        reference = client.create_optimizer("reference", initial_params(), CONFIG)
        for worker_id, count in (("container", CONTAINER_PUSHES), ("host", HOST_PUSHES)):
            for seq in range(1, count + 1):
                reference.push(gradients(worker_id, seq))
        for state in (lambda o: o.pull(), lambda o: o.pull_slot("m"), lambda o: o.pull_slot("v"),
                      lambda o: o.pull_slot("vhat")):
            got, want = state(optimizer), state(reference)
            assert got.keys() == want.keys() == SHAPES.keys()
            for name in SHAPES:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        final_version = info.version

    # SIGTERM (the image's STOPSIGNAL): drain, a final checkpoint of every optimizer, exit 0.
    podman("stop", "--time", "60", second.name, timeout=120)
    stopped = second.wait_exited(timeout=60)
    assert stopped["ExitCode"] == 0, f"{stopped}\n{second.logs()}"
    mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume, timeout=60).stdout.strip())
    for name, version in (("killed", final_version), ("reference", CONTAINER_PUSHES + HOST_PUSHES)):
        manifest = json.loads((mountpoint / name / "manifest.json").read_text())
        assert manifest["checkpoints"][0]["version"] == version, (name, manifest)
        assert (mountpoint / name / manifest["checkpoints"][0]["file"]).stat().st_uid == int(USER)
