"""The images of docker/, built and run with podman: health, pushes, SIGKILL, SIGTERM, non-root, read-only.

Runs only with `--containers` (`make test-containers`, as root): it builds a local Debian
base (kept between runs), the server and worker images on it, and runs them with published
ports on 127.0.0.1 only. Everything else it makes is removed at the end, and every wait is
bounded. `make test` skips it: it needs neither root nor podman.
"""

import contextlib
import copy
import inspect
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client
from tests.podman import (
    RUN_LABEL, Unavailable, build, check_prerequisites, image_size, new_run_id, podman, remove_labelled, run_tool,
)
from tests.test_deploy import DOCKER, free_port, healthcheck, statefulset

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
    left = remove_labelled(f"{RUN_LABEL}={value}")
    assert not left, f"could not remove {left} (label {RUN_LABEL}={value})"


@pytest.fixture(scope="module")
def images(run_id: str, request: pytest.FixtureRequest) -> dict[str, str]:
    """The server and worker images, built from this tree on the local base (or those given by --images)."""
    if given := request.config.getoption("--images"):
        server, worker = given.split(",")
        return {"Dockerfile": server, "Dockerfile.worker": worker}
    built = {}
    for dockerfile, tag in (("Dockerfile", f"localhost/optserve-test:cpu-{run_id}"),
                            ("Dockerfile.worker", f"localhost/optserve-test-worker:{run_id}")):
        started = time.monotonic()
        built[dockerfile] = build(dockerfile, tag, run_id)
        print(f"{dockerfile}: built in {time.monotonic() - started:.0f} s, {image_size(tag) / 1e6:.0f} MB")
    return built


class Container:
    """A container podman runs (by `podman run`, podman-compose or `podman kube play`), by name."""

    def __init__(self, name: str, address: str = ""):
        self.name = name
        self.address = address  # where the host reaches its gRPC port, if published

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


def start_server(image: str, run_id: str, volume: str, port: int, bulk_port: int) -> Container:
    """A server container on a named volume, its gRPC and bulk ports published on 127.0.0.1."""
    server = Container(f"optserve-test-{new_run_id()}", f"127.0.0.1:{port}")
    # The bulk port is the same inside and out: clients dial the gRPC host at the port the server names.
    podman("run", "-d", "--name", server.name, "--label", f"{RUN_LABEL}={run_id}", "--read-only",
           "-p", f"127.0.0.1:{port}:50051", "-p", f"127.0.0.1:{bulk_port}:{bulk_port}",
           "-v", f"{volume}:{DATA_DIR}", image, "--bulk-port", str(bulk_port), timeout=120)
    return server


@pytest.fixture(scope="module")
def volume(run_id: str) -> str:
    name = f"optserve-test-{run_id}"
    podman("volume", "create", "--label", f"{RUN_LABEL}={run_id}", name, timeout=60)
    return name


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def first_server(images, run_id, volume, ports) -> Container:
    server = start_server(images["Dockerfile"], run_id, volume, *ports)
    server.wait_healthy()
    return server


# -------------------------------------------------------------------------------- tests


def test_the_server_image_keeps_its_healthcheck_and_runs_as_its_user_on_a_read_only_root(first_server) -> None:
    config = json.loads(podman("inspect", "--format", "{{json .Config}}", first_server.name, timeout=60).stdout)
    assert config["Healthcheck"]["Test"] == ["CMD", *healthcheck("Dockerfile")], config.get("Healthcheck")
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
                    images["Dockerfile.worker"], "python", "-c", WORKER_SCRIPT, address, "killed",
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
    second = start_server(images["Dockerfile"], run_id, volume, *ports)
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
        assert "bulk" in {c["transport"] for c in info.clients}  # the published bulk port carried the pushes

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


# ------------------------------------------------------------- Kubernetes and compose


def statefulset_pod(image: str, volume: str, grpc_port: int, run_id: str) -> dict:
    """docker/k8s's StatefulSet's pod template as a Pod for `podman kube play`: IMAGE, the claim as VOLUME,
    gRPC published on 127.0.0.1:GRPC_PORT (the other ports unpublished)."""
    template = copy.deepcopy(statefulset()["spec"]["template"])
    spec = template["spec"]
    (container,) = spec["containers"]
    container["image"] = image
    for port in container["ports"]:
        if port["name"] == "grpc":
            port.update(hostPort=grpc_port, hostIP="127.0.0.1")
    (claim,) = statefulset()["spec"]["volumeClaimTemplates"]
    spec["volumes"].append({"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": volume}})
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": f"optserve-test-{run_id}", "labels": {**template["metadata"]["labels"],
                                                                        RUN_LABEL: run_id}}}


def wait_serving(server: Container, service: str, deadline: float) -> None:
    """Polls the gRPC health service of SERVER for SERVICE, as kubelet's gRPC probe does, until SERVING."""
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert server.state()["Running"], f"{server.name} exited:\n{server.logs()}"
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                if health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"health of {service!r} not SERVING:\n{server.logs()}"
            time.sleep(1)


def test_the_statefulsets_pod_template_runs_with_podman_kube_play(images, run_id, tmp_path) -> None:
    """The StatefulSet's pod as a Pod: its gRPC probes answer SERVING, its volume is at --data-dir."""
    volume, port = f"optserve-test-kube-{run_id}", free_port()
    podman("volume", "create", "--label", f"{RUN_LABEL}={run_id}", volume, timeout=60)
    pod = statefulset_pod(images["Dockerfile"], volume, port, run_id)
    (container,) = pod["spec"]["containers"]
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    before = kube_infrastructure()
    try:
        podman("kube", "play", str(manifest), timeout=180)
        server = Container(f"{pod['metadata']['name']}-{container['name']}", f"127.0.0.1:{port}")
        startup = container["startupProbe"]
        deadline = time.monotonic() + min(240, startup["periodSeconds"] * startup["failureThreshold"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 50051  # the containerPort published above
            wait_serving(server, container[probe]["grpc"].get("service", ""), deadline)

        (inspected,) = json.loads(podman("inspect", server.name, timeout=60).stdout)
        data_dir = container["command"][container["command"].index("--data-dir") + 1]
        mounts = {mount["Destination"]: mount for mount in inspected["Mounts"]}
        assert mounts[data_dir]["Type"] == "volume" and mounts[data_dir]["Name"] == volume, mounts
        assert inspected["HostConfig"]["ReadonlyRootfs"] is True  # readOnlyRootFilesystem
        user = str(pod["spec"]["securityContext"]["runAsUser"])
        assert podman("exec", server.name, "id", "-u", timeout=60).stdout.split() == [user]
        with Client(server.address, timeout=120) as client:
            client.create_optimizer("kube", initial_params(), CONFIG).save()
        mountpoint = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume,
                                 timeout=60).stdout.strip())
        assert (mountpoint / "kube" / "manifest.json").is_file(), sorted(p.name for p in mountpoint.iterdir())
    finally:
        podman("kube", "down", str(manifest), timeout=120, check=False)
        for kind, name in kube_infrastructure() - before:  # what kube play made for itself on first use
            podman(*{"image": ["rmi"], "network": ["network", "rm"]}[kind], name, timeout=60)


def kube_infrastructure() -> set[tuple[str, str]]:
    """The network and pause images `podman kube play` makes for itself on first use, where they exist."""
    found = {("image", image) for image in podman("images", "-q", "--filter", "reference=localhost/podman-pause",
                                                   timeout=60).stdout.split()}
    if podman("network", "exists", "podman-default-kube-network", timeout=60, check=False).returncode == 0:
        found.add(("network", "podman-default-kube-network"))
    return found


def compose_command(project: str, files: list[Path]) -> list[str]:
    """podman-compose on FILES as project PROJECT (its containers, network and volumes carry that name)."""
    argv = [str(Path(sys.executable).with_name("podman-compose")), "-p", project]
    for file in files:
        argv += ["-f", str(file)]
    return argv


def test_compose_brings_up_a_healthy_server_whose_demo_workers_train_and_down_keeps_the_volume(
        images, run_id, tmp_path) -> None:
    """docker/compose.yaml as it is, on the images built here, with the host ports moved to free ones."""
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    workers = [name for name in services if name != "server"]
    port = free_port()
    # !override replaces a list where compose would merge it: the file's fixed host ports would
    # collide with anything else on this machine; the demos run fewer steps than the default.
    override = {"server": f'    image: {images["Dockerfile"]}\n    ports: !override ["127.0.0.1:{port}:50051"]\n'}
    for name in workers:
        command = json.dumps([*services[name]["command"], "--steps", "20"])
        override[name] = f'    image: {images["Dockerfile.worker"]}\n    command: !override {command}\n'
    overrides = tmp_path / "override.yaml"
    overrides.write_text("services:\n" + "".join(f"  {name}:\n{text}" for name, text in override.items()))
    project = f"optserve-test-{run_id}"
    compose = compose_command(project, [DOCKER / "compose.yaml", overrides])
    try:
        run_tool([*compose, "up", "-d", "--no-build"], timeout=300)
        server = project_container(compose, "server", f"127.0.0.1:{port}")
        server.wait_healthy()
        for name in workers:
            worker = project_container(compose, name)
            state = worker.wait_exited(timeout=400)
            assert state["ExitCode"] == 0, f"{name}: {state}\n{worker.logs()}"
            logs = worker.logs()
            assert "[sync] held-out accuracy" in logs and "[async] held-out accuracy" in logs, logs
        run_tool([*compose, "down"], timeout=300)
        volume = f"{project}_{next(iter(yaml.safe_load((DOCKER / 'compose.yaml').read_text())['volumes']))}"
        assert podman("volume", "exists", volume, timeout=60, check=False).returncode == 0, f"down removed {volume}"
    finally:
        run_tool([*compose, "down", "-v", "-t", "5"], timeout=300, check=False)
        remove_labelled(f"io.podman.compose.project={project}")


@contextlib.contextmanager
def sharded_project(images: dict[str, str], run_id: str, tmp_path: Path) -> Iterator[tuple[list[str], dict]]:
    """podman-compose on docker/compose.sharded.yaml as it is, on the images built here, with the host
    ports moved to free ones (each bulk port the same inside and out) and the demos shortened;
    yields its command and {service: (gRPC port, bulk port) or None}, and takes it all down after."""
    services = yaml.safe_load((DOCKER / "compose.sharded.yaml").read_text())["services"]
    ports = {name: (free_port(), free_port()) if name.startswith("shard-") else None for name in services}
    text = "services:\n"
    for name, published in ports.items():
        if published:
            port, bulk = published
            text += (f"  {name}:\n    image: {images['Dockerfile']}\n    command: [--bulk-port, '{bulk}']\n"
                     f"    ports: !override ['127.0.0.1:{port}:50051', '127.0.0.1:{bulk}:{bulk}']\n")
        else:
            command = json.dumps([*services[name]["command"], "--steps", "20"])
            text += f"  {name}:\n    image: {images['Dockerfile.worker']}\n    command: !override {command}\n"
    overrides = tmp_path / "override.yaml"
    overrides.write_text(text)
    project = f"optserve-test-sharded-{run_id}"
    try:
        yield compose_command(project, [DOCKER / "compose.sharded.yaml", overrides]), ports
    finally:
        run_tool([*compose_command(project, [DOCKER / "compose.sharded.yaml", overrides]), "down", "-v", "-t", "5"],
                 timeout=300, check=False)
        remove_labelled(f"io.podman.compose.project={project}")


def project_container(compose: list[str], service: str, address: str = "") -> Container:
    """The container podman-compose names PROJECT_SERVICE_1."""
    return Container(f"{compose[compose.index('-p') + 1]}_{service}_1", address)


def test_the_sharded_compose_file_brings_up_3_healthy_shards_each_on_its_own_volume(images, run_id, tmp_path):
    with sharded_project(images, run_id, tmp_path) as (compose, ports):
        shards = sorted(name for name, published in ports.items() if published)
        run_tool([*compose, "up", "-d", "--no-build", *shards], timeout=300)
        volumes = set()
        for name in shards:
            shard = project_container(compose, name, f"127.0.0.1:{ports[name][0]}")
            shard.wait_healthy()
            (inspected,) = json.loads(podman("inspect", shard.name, timeout=60).stdout)
            (mount,) = [m for m in inspected["Mounts"] if m["Destination"] == DATA_DIR]
            volumes.add(mount["Name"])
            with Client(shard.address, timeout=120, transport="network") as client:  # through its bulk port
                optimizer = client.create_optimizer(f"on-{name}", initial_params(), CONFIG)
                assert int(optimizer.push(gradients(name, 1), worker_id=name, seq=1)) == 1
                assert {c["transport"] for c in optimizer.info().clients} == {"grpc", "bulk"}  # create, push
        assert len(volumes) == len(shards), volumes
        run_tool([*compose, "down"], timeout=300)
        for volume in volumes:
            assert podman("volume", "exists", volume, timeout=60, check=False).returncode == 0, f"down removed {volume}"


def test_the_sharded_compose_workers_train_one_optimizer_over_the_3_shards(images, run_id, tmp_path):
    with sharded_project(images, run_id, tmp_path) as (compose, ports):
        run_tool([*compose, "up", "-d", "--no-build"], timeout=300)
        for name in (name for name, published in ports.items() if published):  # healthy, as depends_on asks
            project_container(compose, name).wait_healthy()
        for name in (name for name, published in ports.items() if not published):
            worker = project_container(compose, name)
            state = worker.wait_exited(timeout=400)
            logs = worker.logs()
            assert state["ExitCode"] == 0, f"{name}: {state}\n{logs}"
            assert "[sync] held-out accuracy" in logs and "[async] held-out accuracy" in logs, logs
