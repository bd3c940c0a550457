"""The container images, compose file and Kubernetes manifests in docker/ refer to real things.

No Docker engine runs here, so no image is built or run. Instead these tests parse every
Dockerfile, docker/compose.yaml and every manifest of docker/k8s, check each `optserve`
command, flag, port, path and name in them against the real CLI, the real server and the
repository, install each image's venv outside Docker with the very RUN line of its
Dockerfile (docker/install.sh), run the images' commands from those venvs against servers
on 127.0.0.1, and run the workers' demo commands. Nothing leaves the loopback interface.
"""

import functools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client import Client

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
SHARDED = DOCKER / "k8s-sharded"  # an overlay of K8S: the server as 3 shards
SERVER_IMAGES = ("Dockerfile", "Dockerfile.cuda")
DOCKERFILES = (*SERVER_IMAGES, "Dockerfile.worker")
SERVICE = "optserve.v1.OptimizerService"  # the gRPC service whose health the server reports
HEALTH_NAMES = {"", SERVICE}  # README: the server's health service answers for these two
# The tests' own OPTSERVE_* variables would become flags of every command they run.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}


# ---------------------------------------------------------------- parsing the files


@functools.cache
def dockerfile(name: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The stages of docker/NAME, each a tuple of (INSTRUCTION, arguments), continuations joined."""
    stages, current, line = [], [], ""
    for raw in (DOCKER / name).read_text().splitlines():
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            line += text[:-1] + " "
            continue
        instruction, _, args = (line + text).partition(" ")
        line = ""
        if instruction.upper() == "FROM":
            stages.append(current)
            current = []
        current.append((instruction.upper(), args.strip()))
    stages.append(current)
    return tuple(tuple(stage) for stage in stages[1:])  # stages[0]: the ARGs before the first FROM


def final(name: str, instruction: str) -> list[str]:
    """The arguments of every INSTRUCTION in the runtime (last) stage of docker/NAME."""
    return [args for kind, args in dockerfile(name)[-1] if kind == instruction]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not in exec (JSON) form, so no signal reaches optserve: {args}"
    return json.loads(args)


def entrypoint(name: str) -> list[str]:
    (args,) = final(name, "ENTRYPOINT")
    return exec_form(args)


def healthcheck(name: str) -> list[str]:
    (args,) = final(name, "HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    return exec_form(command.strip())


def copies(name: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from another stage)."""
    found = []
    for stage in dockerfile(name):
        for kind, args in stage:
            words = shlex.split(args)
            if kind == "COPY" and not any(word.startswith("--from") for word in words):
                found.append((words[:-1], words[-1]))
    return found


def install_run(name: str) -> list[str]:
    """The RUN line of docker/NAME that calls docker/install.sh, as words."""
    runs = [shlex.split(args) for stage in dockerfile(name) for kind, args in stage
            if kind == "RUN" and "install.sh" in args]
    assert len(runs) == 1, f"{name}: expected one RUN of install.sh, found {runs}"
    return runs[0]


def flag(argv: list[str], name: str) -> str:
    """The value given to --NAME in argv (the last one, as argparse takes it)."""
    values = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]
    values += [word.split("=", 1)[1] for word in argv if word.startswith(name + "=")]
    assert values, f"{name} not given in {argv}"
    return values[-1]


def with_flags(argv: list[str], **values: str) -> list[str]:
    """argv with the values of the given flags (--data_dir for --data-dir) replaced."""
    out = list(argv)
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        assert name in out, f"{name} not given in {argv}"
        out[out.index(name) + 1] = value
    return out


@functools.cache
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@functools.cache
def k8s_files() -> tuple[str, ...]:
    return tuple(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])


@functools.cache
def k8s_objects() -> tuple[dict, ...]:
    return tuple(doc for file in k8s_files() for doc in yaml.safe_load_all((K8S / file).read_text()) if doc)


def k8s(kind: str) -> list[dict]:
    return [doc for doc in k8s_objects() if doc["kind"] == kind]


def statefulset() -> dict:
    (found,) = k8s("StatefulSet")
    return found


def server_container() -> dict:
    (container,) = statefulset()["spec"]["template"]["spec"]["containers"]
    return container


def pod_specs() -> list[tuple[str, dict]]:
    return [(f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"])
            for doc in k8s_objects() if doc["kind"] in ("StatefulSet", "Job")]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a `sh -c` script (enough for the loops the manifests use)."""
    separators = {";", "&&", "||", "|", "do", "done", "then", "else", "fi", "until", "while", "if"}
    commands, current = [], []
    for word in shlex.split(script.replace(";", " ; ")):
        if word in separators:
            commands, current = commands + [current] * bool(current), []
        else:
            current.append(word)
    return commands + [current] * bool(current)


def argv_of(container_or_service: dict) -> list[list[str]]:
    """The commands a container (k8s) or a service (compose) runs: whole, or inside sh -c."""
    argv = list(container_or_service.get("command", [])) + list(container_or_service.get("args", []))
    if argv[:1] in (["sh"], ["/bin/sh"]) and "-c" in argv:
        return shell_commands(argv[argv.index("-c") + 1])
    return [argv] if argv else []


@functools.cache
def invocations() -> dict[str, list[str]]:
    """Every `optserve ...` command line in the deploy files, by where it is."""
    found = {}
    for name in DOCKERFILES:
        if final(name, "ENTRYPOINT"):
            found[f"{name}:ENTRYPOINT"] = entrypoint(name)
        if final(name, "HEALTHCHECK"):
            found[f"{name}:HEALTHCHECK"] = healthcheck(name)
        for args in final(name, "CMD"):
            found[f"{name}:CMD"] = exec_form(args)
    for service_name, service in compose()["services"].items():
        for i, argv in enumerate(argv_of(service)):
            found[f"compose:{service_name}:command{i}"] = argv
        test = service.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            found[f"compose:{service_name}:healthcheck"] = test[1:]
    for where, spec in pod_specs():
        for container in containers(spec):
            for i, argv in enumerate(argv_of(container)):
                found[f"k8s:{where}:{container['name']}:{i}"] = argv
    return {where: argv for where, argv in found.items() if argv[:1] == ["optserve"]}


def health_invocations() -> dict[str, list[str]]:
    return {where: argv for where, argv in invocations().items() if argv[1] == "health"}


@functools.cache
def cli_help(subcommand: str) -> str:
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", subcommand, "--help"],
                         capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert run.returncode == 0, f"`optserve {subcommand}` does not exist:\n{run.stderr}"
    return run.stdout


def cli_flags(subcommand: str) -> set[str]:
    usage = cli_help(subcommand).split("\n\n")[0]  # argparse lists every flag in the usage paragraph
    return set(re.findall(r"--[A-Za-z0-9][\w-]*", usage)) | {"--help"}  # usage shows it as [-h]


def seconds(text) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", str(text))
    assert match, f"not a duration: {text!r}"
    return float(match.group(1)) * {"ms": 1e-3, "s": 1, None: 1, "m": 60}[match.group(2)]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------- the files parse


def test_compose_and_every_kubernetes_manifest_parse_as_yaml() -> None:
    assert set(compose()["services"]) == {"server", "worker-a", "worker-b"}
    assert sorted(k8s_files()) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"), \
        "kustomization.yaml must list every manifest in docker/k8s"
    kinds = sorted(doc["kind"] for doc in k8s_objects())
    assert kinds == ["Job", "Service", "Service", "StatefulSet"]
    for doc in k8s_objects():
        assert doc["apiVersion"] and doc["metadata"]["name"]


@functools.cache
def kustomized(folder: Path) -> tuple[dict, ...]:
    """What `kubectl kustomize FOLDER` applies (skips the test where kubectl is missing)."""
    if shutil.which("kubectl") is None:
        pytest.skip(f"kubectl is not installed here: `kubectl kustomize {folder.relative_to(ROOT)}` not checked")
    run = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


def test_kustomize_builds_the_manifests() -> None:
    built = kustomized(K8S)
    assert sorted(doc["kind"] for doc in built) == sorted(doc["kind"] for doc in k8s_objects())


# The oldest and newest Kubernetes whose API schemas kubernetes-validate carries (offline, in the package).
KUBERNETES_VERSIONS = ("1.25", "1.37")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_the_kubernetes_api_schemas(version: str) -> None:
    """Each object, as written and as each kustomization builds it, against the real OpenAPI schemas (strict)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = [*k8s_objects()]
    if shutil.which("kubectl") is not None:
        objects += [*kustomized(K8S), *kustomized(SHARDED)]
    for doc in objects:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where} against Kubernetes {version}: {err.message} at {list(err.path)}")


def test_the_schema_check_refuses_a_misspelt_or_mistyped_field() -> None:
    """The validation above can fail: strict mode refuses unknown fields and wrong types."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    misspelt = json.loads(json.dumps(statefulset()))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = SERVICE
    mistyped = json.loads(json.dumps(statefulset()))
    mistyped["spec"]["replicas"] = "3"
    for broken in (misspelt, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


# ------------------------------------------------------- scale-out: shards in Kubernetes and compose


def sharded(kind: str) -> list[dict]:
    return [doc for doc in kustomized(SHARDED) if doc["kind"] == kind]


def test_the_sharded_statefulset_runs_one_pod_and_one_volume_per_shard_behind_the_headless_service() -> None:
    (shards,) = sharded("StatefulSet")
    assert shards["spec"]["replicas"] == 3 and shards["spec"]["podManagementPolicy"] == "Parallel"
    assert len(shards["spec"]["volumeClaimTemplates"]) == 1  # a claim per pod: data-optserve-0, -1, -2
    assert shards["spec"]["template"] == statefulset()["spec"]["template"], "the shards run the server as it is"
    (headless,) = sharded("Service")  # no ClusterIP Service: it would route to any one shard
    assert headless["spec"]["clusterIP"] == "None" and shards["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["publishNotReadyAddresses"] is True  # every shard in the answer, even restarting
    assert headless["spec"]["selector"].items() <= shards["spec"]["template"]["metadata"]["labels"].items()


def test_the_sharded_demo_job_dials_the_headless_dns_name_and_waits_for_every_shard() -> None:
    (shards,) = sharded("StatefulSet")
    (headless,) = sharded("Service")
    service, replicas = headless["metadata"]["name"], shards["spec"]["replicas"]
    port = next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    (job,) = sharded("Job")
    spec = job["spec"]["template"]["spec"]
    (demo,) = spec["containers"]
    assert flag(demo["command"], "--address") == f"dns:///{service}.$(POD_NAMESPACE).svc:{port}"
    env = {variable["name"]: variable for variable in demo["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    (wait,) = spec["initContainers"]
    script = wait["command"][wait["command"].index("-c") + 1]
    loop = re.match(r"for (\w+) in ([\d ]+); do (.*); done$", script)
    assert loop and loop.group(2).split() == [str(i) for i in range(replicas)], script
    (health,) = [argv for argv in shell_commands(loop.group(3)) if argv[:2] == ["optserve", "health"]]
    assert health[2] == f"{shards['metadata']['name']}-${loop.group(1)}.{service}:{port}"
    for argv in (demo["command"], health):
        run = subprocess.run([sys.executable, "-m", "optserve.server.cli", *argv[1:], "--help"],
                             capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
        assert run.returncode == 0, f"{shlex.join(argv)}\n{run.stderr}"


@functools.cache
def sharded_compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.sharded.yaml").read_text())


def test_the_sharded_compose_file_runs_3_shards_each_on_its_own_volume_and_ports() -> None:
    services = sharded_compose()["services"]
    shards = sorted(name for name in services if name.startswith("shard-"))
    assert shards == ["shard-0", "shard-1", "shard-2"]
    image_argv = entrypoint("Dockerfile")
    volumes, host_ports = set(), []
    for name in shards:
        shard = services[name]
        assert shard["build"] == compose()["services"]["server"]["build"]
        assert shard["healthcheck"] == compose()["services"]["server"]["healthcheck"]
        assert seconds(shard["stop_grace_period"]) > float(flag(image_argv, "--grace"))
        (mount,) = shard["volumes"]
        volume, target = mount.split(":")
        assert target == flag(image_argv, "--data-dir") and volume in sharded_compose()["volumes"]
        volumes.add(volume)
        argv = [*image_argv, *shard.get("command", [])]  # compose appends command to the image's entrypoint
        run = subprocess.run([sys.executable, "-m", "optserve.server.cli", *argv[1:], "--help"],
                             capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
        assert run.returncode == 0, f"{name}: {run.stderr}"
        published = dict(reversed(mapping.rsplit(":", 1)) for mapping in shard["ports"])
        # The bulk port is the same inside and out: a client dials it at the shard's own host.
        bulk = flag(argv, "--bulk-port")
        assert published[bulk] == f"127.0.0.1:{bulk}" and published["50051"].startswith("127.0.0.1:")
        host_ports += [int(host.rsplit(":", 1)[1]) for host in published.values()]
    assert len(volumes) == len(shards) and len(set(host_ports)) == len(host_ports)


def test_the_sharded_compose_workers_name_every_shard_in_order_and_wait_for_all() -> None:
    services = sharded_compose()["services"]
    shards = sorted(name for name in services if name.startswith("shard-"))
    workers = [name for name in services if name not in shards]
    tags = []
    for name in workers:
        worker = services[name]
        assert worker["image"] == compose()["services"]["worker-a"]["image"]
        assert worker["depends_on"] == {shard: {"condition": "service_healthy"} for shard in shards}
        assert flag(worker["command"], "--address").split(",") == [f"{shard}:50051" for shard in shards]
        tags.append(flag(worker["command"], "--tag"))
    assert len(workers) == 2 and len(set(tags)) == len(tags)


def test_the_deploy_files_run_the_expected_optserve_commands() -> None:
    used = {(where.split(":")[0], argv[1]) for where, argv in invocations().items()}
    for name in SERVER_IMAGES:
        assert {(name, "serve"), (name, "health")} <= used
    assert {("compose", "demo"), ("compose", "health"), ("k8s", "serve"), ("k8s", "demo"), ("k8s", "health")} <= used


# ------------------------------------------------------- commands and flags are real


@pytest.mark.parametrize("where", sorted(invocations()))
def test_every_optserve_command_and_flag_used_exists(where: str) -> None:
    argv = invocations()[where]
    subcommand = argv[1]
    used = [word.split("=", 1)[0] for word in argv[2:] if word.startswith("--")]
    missing = [name for name in used if name not in cli_flags(subcommand)]
    assert not missing, f"{where}: `optserve {subcommand}` has no {missing}"
    # argparse checks each value's type and choices before it reaches the trailing --help.
    run = subprocess.run([sys.executable, "-m", "optserve.server.cli", *argv[1:], "--help"],
                         capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert run.returncode == 0, f"{where}: {shlex.join(argv)}\n{run.stderr}"


# ------------------------------------------------------------ images: paths and users


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_path_copied_into_an_image_exists_and_passes_its_dockerignore(name: str) -> None:
    ignore = DOCKER / f"{name}.dockerignore"
    assert ignore.is_file(), f"{ignore} keeps .venv and .git out of the build context"
    sources = [source for sources, _ in copies(name) for source in sources]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
        assert not dockerignored(ignore, source), f"{ignore.name} leaves {source} out of the build context"
    assert [source for source in sources if source.endswith("install.sh")] == ["docker/install.sh"]


def dockerignored(ignore: Path, path: str) -> bool:
    """Whether .dockerignore rules leave `path` out (the last matching rule wins; a rule matching a parent counts)."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for rule in ignore.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("name", DOCKERFILES)
def test_each_image_runs_as_a_numeric_non_root_user_from_the_install_scripts_venv(name: str) -> None:
    (user,) = final(name, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), f"USER {user}: runAsNonRoot needs a numeric uid"
    useradd = " ".join(final(name, "RUN"))
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd
    words = install_run(name)
    venv = words[words.index("/tmp/install.sh") + 3]
    assert f"COPY --from=build {venv} {venv}" in [f"COPY {args}" for args in final(name, "COPY")]
    assert any(f"PATH={venv}/bin:" in args for args in final(name, "ENV"))


@pytest.mark.parametrize("name", SERVER_IMAGES)
def test_the_server_images_volume_is_the_data_dir_and_belongs_to_the_user(name: str) -> None:
    data_dir = flag(entrypoint(name), "--data-dir")
    assert final(name, "VOLUME") == [data_dir]
    uid, _, gid = final(name, "USER")[0].partition(":")
    assert any(f"install -d -o {uid} -g {gid}" in args and data_dir in args for args in final(name, "RUN"))


def test_the_cuda_image_is_the_cpu_image_with_jax_cuda12_on_a_cuda_12_runtime_base() -> None:
    for instruction in ("ENTRYPOINT", "HEALTHCHECK", "EXPOSE", "VOLUME", "USER", "STOPSIGNAL", "WORKDIR", "ENV"):
        assert final("Dockerfile.cuda", instruction) == final("Dockerfile", instruction), instruction
    cpu, cuda = install_run("Dockerfile"), install_run("Dockerfile.cuda")
    assert cuda == ["PYTHON=python3", *cpu, "jax[cuda12]"]
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)", (DOCKER / "Dockerfile.cuda").read_text(), re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.[\d.]+-runtime-ubuntu24\.04", base), base
    from importlib.metadata import metadata

    assert "cuda12" in metadata("jax").get_all("Provides-Extra"), "this jax has no cuda12 extra"


def test_the_worker_image_has_the_demo_extra_and_no_server_extra() -> None:
    words = install_run("Dockerfile.worker")
    extras = words[words.index("/tmp/install.sh") + 2]
    assert extras.split(",") == ["demo"]
    assert not final("Dockerfile.worker", "ENTRYPOINT") and not final("Dockerfile.worker", "EXPOSE")


# ------------------------------------------------------------- ports, names, grace


def test_ports_agree_between_the_images_compose_and_kubernetes() -> None:
    grpc_port, bulk_port, metrics_port = 50051, 50052, 9090  # bulk: a fixed port a container can publish
    for name in SERVER_IMAGES:
        argv = entrypoint(name)
        assert (int(flag(argv, "--port")), int(flag(argv, "--bulk-port")), int(flag(argv, "--metrics-port"))) == (
            grpc_port, bulk_port, metrics_port)
        assert final(name, "EXPOSE") == [f"{grpc_port} {bulk_port} {metrics_port}"]
        assert host_port(healthcheck(name)[2]) == ("127.0.0.1", grpc_port)

    services = compose()["services"]
    published = {int(mapping.rsplit(":", 1)[1]) for mapping in services["server"]["ports"]}
    assert published == {grpc_port, bulk_port, metrics_port}
    assert host_port(services["server"]["healthcheck"]["test"][3]) == ("127.0.0.1", grpc_port)
    for worker in ("worker-a", "worker-b"):
        assert host_port(flag(services[worker]["command"], "--address")) == ("server", grpc_port)

    container = server_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": grpc_port, "bulk": bulk_port, "metrics": metrics_port}
    command = container["command"]
    assert (int(flag(command, "--port")), int(flag(command, "--bulk-port")), int(flag(command, "--metrics-port"))) == (
        grpc_port, bulk_port, metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    annotations = statefulset()["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    for service in k8s("Service"):
        for port in service["spec"]["ports"]:
            assert ports[port["targetPort"]] == port["port"], (service["metadata"]["name"], port)


def test_the_kubernetes_services_select_the_server_pod_and_the_job_dials_the_clusterip_service() -> None:
    labels = statefulset()["spec"]["template"]["metadata"]["labels"]
    assert statefulset()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    headless = [s for s in k8s("Service") if s["spec"].get("clusterIP") == "None"]
    cluster_ip = [s for s in k8s("Service") if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == len(cluster_ip) == 1
    assert statefulset()["spec"]["serviceName"] == headless[0]["metadata"]["name"]
    for service in k8s("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
    name = cluster_ip[0]["metadata"]["name"]
    port = next(p["port"] for p in cluster_ip[0]["spec"]["ports"] if p["name"] == "grpc")
    addresses = [argv[2] if argv[1] == "health" else flag(argv, "--address")
                 for where, argv in invocations().items() if where.startswith("k8s:Job/")]
    assert len(addresses) == 2  # the init container's wait and the demo
    for address in addresses:
        host, dialled = host_port(address)
        assert (host == name or host.startswith(name + ".")) and dialled == port, address


def test_the_images_named_in_compose_and_kubernetes_are_the_ones_built_here() -> None:
    services = compose()["services"]
    for service, dockerfile_name in (("server", "Dockerfile"), ("worker-a", "Dockerfile.worker"),
                                     ("worker-b", "Dockerfile.worker")):
        build = services[service]["build"]
        assert (DOCKER / build["context"]).resolve() == ROOT, "the build context is the repository root"
        assert build["dockerfile"] == f"docker/{dockerfile_name}"
    kustomized = {entry["name"] for entry in yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]}
    images = {container["image"].split(":")[0] for _, spec in pod_specs() for container in containers(spec)}
    assert images == kustomized == {services["server"]["image"].split(":")[0], services["worker-a"]["image"]}


def test_probe_and_healthcheck_service_names_are_the_ones_the_real_server_reports(server) -> None:
    container = server_container()
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    names = {container[p]["grpc"].get("service", "") for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    names |= {flag(argv, "--service") for argv in health_invocations().values()}
    assert names <= HEALTH_NAMES
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in names:
            response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING, name


def test_the_data_volume_is_mounted_at_the_data_dir() -> None:
    image_data_dir = flag(entrypoint("Dockerfile"), "--data-dir")
    server = compose()["services"]["server"]
    assert "command" not in server and "entrypoint" not in server, "compose runs the image's entrypoint"
    volume, target = server["volumes"][0].split(":")[:2]
    assert target == image_data_dir and volume in compose()["volumes"]

    container = server_container()
    (claim,) = statefulset()["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == flag(container["command"], "--data-dir") == image_data_dir


def test_the_stop_timeouts_exceed_the_servers_grace() -> None:
    grace = float(flag(entrypoint("Dockerfile"), "--grace"))
    assert seconds(compose()["services"]["server"]["stop_grace_period"]) > grace
    spec = statefulset()["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > float(flag(server_container()["command"], "--grace"))
    for name in SERVER_IMAGES:
        assert final(name, "STOPSIGNAL") == ["SIGTERM"]


def test_compose_workers_wait_for_a_healthy_server_and_tag_their_optimizers_apart() -> None:
    services = compose()["services"]
    assert services["server"]["healthcheck"]["test"][:3] == ["CMD", "optserve", "health"]
    tags = []
    for worker in ("worker-a", "worker-b"):
        assert services[worker]["depends_on"] == {"server": {"condition": "service_healthy"}}
        command = services[worker]["command"]
        assert command[:2] == ["optserve", "demo"] and flag(command, "--workers") == "2"
        tags.append(flag(command, "--tag"))
    assert len(set(tags)) == len(tags)


def test_kubernetes_pods_are_non_root_bounded_and_free_of_service_link_variables() -> None:
    (uid, gid) = final("Dockerfile", "USER")[0].split(":")
    for where, spec in pod_specs():
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == int(uid), where
        # A Service named optserve would set OPTSERVE_PORT=tcp://...: the CLI would read it as --port.
        assert spec["enableServiceLinks"] is False, where
        for container in containers(spec):
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), container["name"]
            assert {"cpu", "memory"} <= container["resources"]["limits"].keys(), container["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # The root filesystems are read-only: the server and the demo (its plot, matplotlib) write to /tmp.
        assert "/tmp" in {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}, where
    assert statefulset()["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == int(gid)
    assert statefulset()["spec"]["replicas"] == 1


def test_the_startup_probe_gives_a_restore_minutes_before_liveness_counts() -> None:
    startup = server_container()["startupProbe"]
    assert startup["grpc"] == server_container()["livenessProbe"]["grpc"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_the_readme_names_only_files_that_exist() -> None:
    text = (DOCKER / "README.md").read_text()
    paths = set(re.findall(r"\bdocker/[\w./-]*[\w]", text))
    assert {"docker/Dockerfile", "docker/Dockerfile.cuda", "docker/Dockerfile.worker", "docker/compose.yaml",
            "docker/k8s", "docker/install.sh"} <= paths
    for path in paths:
        assert (ROOT / path).exists(), path


# ------------------------------------------- the install script and the images' commands


def build_venv(name: str, root: Path) -> Path:
    """Does what docker/NAME's build stage does, outside Docker: its COPY lines (through its
    .dockerignore) into `root`, then its RUN of install.sh with the image's paths under `root`."""
    ignore = DOCKER / f"{name}.dockerignore"
    for sources, destination in copies(name):
        dest = root / destination.lstrip("/")
        for source in map(ROOT.joinpath, sources):
            if source.is_file():  # a file goes into DEST/ or becomes DEST
                pairs = [(source, dest / source.name if destination.endswith("/") else dest)]
            else:  # a folder's contents go into DEST
                pairs = [(file, dest / file.relative_to(source)) for file in source.rglob("*") if file.is_file()]
            for file, target in pairs:
                if not dockerignored(ignore, file.relative_to(ROOT).as_posix()):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, target)
    words = install_run(name)
    assert words[:2] == ["sh", "/tmp/install.sh"], words
    args = [str(root / w.lstrip("/")) if w.startswith("/") else w for w in words[2:]]
    started = time.perf_counter()
    run = subprocess.run(["sh", str(root / "tmp/install.sh"), *args], capture_output=True, text=True,
                         timeout=280, env={**ENV, "PYTHON": sys.executable})  # under pytest-timeout's 300 s
    assert run.returncode == 0, f"install.sh failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    print(f"install.sh {' '.join(words[3:])}: {time.perf_counter() - started:.0f} s")
    return root / words[4].lstrip("/")


@pytest.fixture(scope="module")
def server_venv(tmp_path_factory) -> Path:
    """The CPU server image's venv, made by install.sh outside Docker (about 25 s here)."""
    return build_venv("Dockerfile", tmp_path_factory.mktemp("server-image"))


@pytest.fixture(scope="module")
def worker_venv(tmp_path_factory) -> Path:
    """The worker image's venv, made by install.sh outside Docker (about 25 s here)."""
    return build_venv("Dockerfile.worker", tmp_path_factory.mktemp("worker-image"))


def in_venv(venv: Path, argv: list[str]) -> list[str]:
    """argv as the image runs it: `optserve` is the venv's (the image puts its bin first on PATH)."""
    return [str(venv / "bin" / argv[0]), *argv[1:]]


def test_the_install_script_refuses_a_call_without_a_source() -> None:
    run = subprocess.run(["sh", str(DOCKER / "install.sh")], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "usage" in run.stderr


def test_the_worker_venv_has_the_demo_and_the_client_but_no_jax(worker_venv: Path) -> None:
    python = worker_venv / "bin" / "python"
    check = "import importlib.util as u; print(sorted(m for m in ('jax', 'sklearn', 'matplotlib', 'grpc') " \
            "if u.find_spec(m)))"
    run = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=60, env=ENV)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["['grpc',", "'matplotlib',", "'sklearn']"]


def test_the_server_venv_has_jax(server_venv: Path) -> None:
    run = subprocess.run([server_venv / "bin" / "python", "-c", "import jax; print(jax.__version__)"],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert run.returncode == 0, run.stderr


def image_venv(where: str, server_venv: Path, worker_venv: Path) -> Path:
    """The venv of the image a command runs in: the worker image for demos and the Job, else the server's."""
    return worker_venv if "worker" in where or where.startswith("k8s:Job/") else server_venv


@pytest.mark.parametrize("where", sorted(health_invocations()))
def test_each_health_check_exits_0_for_a_serving_server_and_1_for_none(where, server, server_venv, worker_venv):
    argv = in_venv(image_venv(where, server_venv, worker_venv), health_invocations()[where])
    served = subprocess.run([*argv[:2], server.address, *argv[3:]], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert served.returncode == 0, f"{where}: {served.stdout}{served.stderr}"
    nobody = subprocess.run([*argv[:2], f"127.0.0.1:{free_port()}", *argv[3:]], capture_output=True, text=True,
                            timeout=60, env=ENV)
    assert nobody.returncode == 1, f"{where}: {nobody.stdout}{nobody.stderr}"


SERVER_COMMANDS = {"Dockerfile": lambda: entrypoint("Dockerfile"), "k8s": lambda: server_container()["command"]}


@pytest.mark.parametrize("where", sorted(SERVER_COMMANDS))
def test_the_server_command_serves_health_and_metrics_keeps_state_and_exits_0_on_sigterm(
        where: str, server_venv: Path, tmp_path: Path) -> None:
    # Bound to 127.0.0.1, not 0.0.0.0: these tests reach only the loopback interface.
    port, metrics_port, data_dir = free_port(), free_port(), tmp_path / "data"
    data_dir.mkdir()
    argv = with_flags(SERVER_COMMANDS[where](), host="127.0.0.1", port=str(port),
                      metrics_port=str(metrics_port), data_dir=str(data_dir))
    log = (tmp_path / "server.log").open("w+")
    process = subprocess.Popen(in_venv(server_venv, argv), stdout=log, stderr=subprocess.STDOUT, env=ENV,
                               cwd=tmp_path)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                assert process.poll() is None and time.monotonic() < deadline, _tail(log)
                try:
                    request = health_pb2.HealthCheckRequest(service=SERVICE)
                    if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert response.status == 200 and b"# TYPE" in response.read()
        with Client(address, timeout=60) as client:
            opt = client.create_optimizer("kept", {"w": np.zeros(3, np.float32)}, {"learning_rate": 0.1})
            opt.push({"w": np.ones(3, np.float32)})
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=float(flag(argv, "--grace")) + 60) == 0, _tail(log)
        assert (data_dir / "kept" / "manifest.json").is_file(), sorted(p.name for p in data_dir.rglob("*"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def test_the_compose_and_kubernetes_demo_commands_train_side_by_side_from_the_worker_venv(
        server, worker_venv: Path, tmp_path: Path) -> None:
    demos = {where: argv for where, argv in invocations().items() if argv[1] == "demo" and "--address" in argv}
    assert len(demos) == 3  # compose worker-a and worker-b, the Kubernetes Job
    processes = {}
    for where, argv in demos.items():
        plot = flag(argv, "--plot")
        if Path(plot).is_absolute():  # the Job's /tmp: a volume there, a folder of this test here
            argv = with_flags(argv, plot=str(tmp_path / Path(plot).name))
        argv = [*with_flags(argv, address=server.address), "--steps", "6"]  # shorter than the default
        log = (tmp_path / f"{where.replace('/', '_')}.log").open("w+")
        processes[where] = (subprocess.Popen(in_venv(worker_venv, argv), stdout=log, stderr=subprocess.STDOUT,
                                             env={**ENV, "MPLBACKEND": "Agg"}, cwd=tmp_path), log)
    deadline = time.monotonic() + 240
    try:
        for where, (process, log) in processes.items():
            try:
                status = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{where} still running after 240 s:\n{_tail(log)}")
            assert status == 0, f"{where}:\n{_tail(log)}"
    finally:
        for process, _ in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["demo-a.png", "demo-b.png", "demo-k8s.png"]


def test_the_demo_hands_the_shards_of_a_compose_worker_to_the_client_as_a_list_in_order() -> None:
    from optserve.server.cli import _demo_address

    for name in ("worker-a", "worker-b"):
        address = flag(sharded_compose()["services"][name]["command"], "--address")
        assert _demo_address(address) == ["shard-0:50051", "shard-1:50051", "shard-2:50051"]
    for one in ("server:50051", "dns:///optserve-headless.default.svc:50051", None):
        assert _demo_address(one) == one  # one server, or every address behind a DNS name


def test_every_package_folder_is_in_the_distribution() -> None:
    """A subpackage missing from pyproject installs from a checkout (editable) but not from a wheel or an image."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    roots = {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}
    found = set()
    for package, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            owner = max((other for other in roots.values() if other == init.parent or other in init.parents),
                        key=lambda path: len(path.parts))
            if owner == folder:  # not inside another package's own folder (client/generated is optserve.v1)
                found.add(".".join((package, *init.parent.relative_to(folder).parts)))
    missing = found - set(setuptools["packages"])
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {sorted(missing)}"
