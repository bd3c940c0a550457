"""Podman for the container tests: a local Debian base, image builds, and everything a test makes, removed.

No image registry is reachable from the development machines, so the base image is made
here with debootstrap and `podman import`, and kept (it takes minutes) under a tag that
names its recipe. Everything else a test builds or runs carries the label RUN_LABEL and is
removed by `remove_labelled`. Every podman call is bounded in time.
"""

import atexit
import fcntl
import functools
import hashlib
import json
import os
import resource
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = "runc"  # crun refuses the rlimits of these machines; runc does not
TOOLS = ("podman", "runc", "debootstrap")  # Debian packages of the same names (docker/test-containers.sh)
SUITE = "bookworm"  # Debian 12: Python 3.11, as python:3.11-slim-bookworm
MIRROR = os.environ.get("DEBOOTSTRAP_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Dropped from the base after debootstrap: nothing at run time reads them.
BASE_PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt/archives",
              "var/lib/apt/lists", "var/log")
RECIPE = json.dumps([SUITE, MIRROR, BASE_PACKAGES, BASE_PRUNE, "minbase"])
BASE_IMAGE = f"localhost/optserve-base:{SUITE}-{hashlib.sha256(RECIPE.encode()).hexdigest()[:12]}"
CA_CERTIFICATES = "/etc/ssl/certs"  # the host's, mounted read-only into builds (TLS to PyPI as the host sees it)
RUN_LABEL = "optserve.test-run"
LOCK = Path("/var/lock/optserve-base.lock")


class Unavailable(Exception):
    """Why the container tests cannot run on this machine (not a failure of the images)."""


def podman(*args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `podman ARGS` (with `engine_env`) within `timeout` seconds; raises with its output when it fails and `check`."""
    return run_tool(["podman", *args], timeout=timeout, check=check)


def run_tool(argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a podman-driven command (podman, podman-compose) under `engine_env`, bounded by `timeout`."""
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=engine_env())
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(argv)[:300]} exited {run.returncode}:\n{run.stdout[-3000:]}"
                             f"\n{run.stderr[-3000:]}")
    return run


def ulimits() -> tuple[str, str]:
    """nofile and nproc limits within the host's own: runc refuses podman's defaults here.

    nproc goes no higher than kernel.pid_max (no more processes can exist): these machines
    refuse an nproc above it even where the host's own limit is higher.
    """
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = [pid_max if n == resource.RLIM_INFINITY else min(n, pid_max)
             for n in resource.getrlimit(resource.RLIMIT_NPROC)]
    return f"nofile={nofile[0]}:{nofile[1]}", f"nproc={nproc[0]}:{nproc[1]}"


@functools.cache
def engine_env() -> dict[str, str]:
    """This process's environment plus CONTAINERS_CONF: runc and `ulimits` for every container podman starts.

    One file read by podman, podman-compose and `podman kube play` alike (the last has no
    --ulimit flag); it replaces the host's containers.conf for these calls only.
    """
    folder = Path(tempfile.mkdtemp(prefix="optserve-podman-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    conf = folder / "containers.conf"
    conf.write_text(f"[containers]\ndefault_ulimits = {json.dumps(list(ulimits()))}\n"
                    f"[engine]\nruntime = \"{RUNTIME}\"\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def check_prerequisites() -> None:
    """Raises Unavailable, saying why, unless this is root with podman, runc and debootstrap installed."""
    if os.geteuid() != 0:
        raise Unavailable("the container tests need root (rootful podman with runc); run `make test-containers` "
                          "as root")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"not installed: {', '.join(missing)} (`make test-containers` installs them with apt-get)")


def base_image(timeout: float = 900) -> str:
    """The local Debian base (debootstrap, then `podman import`), made once per recipe and kept."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:  # two runs at once make it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", BASE_IMAGE, timeout=60, check=False).returncode == 0:
            return BASE_IMAGE
        with tempfile.TemporaryDirectory(prefix="optserve-base-", dir="/var/tmp") as scratch:
            root = Path(scratch) / "root"
            run = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
                                  str(root), MIRROR], capture_output=True, text=True, timeout=timeout)
            if run.returncode != 0:
                raise Unavailable(f"debootstrap of {SUITE} from {MIRROR} failed (is the mirror reachable?):\n"
                                  f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
            for path in BASE_PRUNE:
                shutil.rmtree(root / path, ignore_errors=True)
                (root / path).mkdir(parents=True, exist_ok=True)
            archive = Path(scratch) / "root.tar"
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive), "."], check=True,
                           timeout=300)
            podman("import", "--change", "CMD [\"/bin/bash\"]", "--change", "ENV LANG=C.UTF-8",
                   str(archive), BASE_IMAGE, timeout=300)
        return BASE_IMAGE


def build(dockerfile: str, tag: str, run_id: str, timeout: float = 900) -> str:
    """Builds docker/DOCKERFILE on the local base as TAG, labelled with this run, and returns TAG."""
    podman("build", "--format", "docker", "--network", "host", "--layers=false", "--force-rm",
           "-v", f"{CA_CERTIFICATES}:{CA_CERTIFICATES}:ro",
           "--build-arg", f"PYTHON_IMAGE={base_image()}", "--label", f"{RUN_LABEL}={run_id}",
           "-f", str(ROOT / "docker" / dockerfile), "-t", tag, str(ROOT), timeout=timeout)
    return tag


def image_size(tag: str) -> int:
    """Bytes of the image's layers, as `podman images` reports its size."""
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag, timeout=60).stdout.strip())


def new_run_id() -> str:
    return uuid.uuid4().hex[:10]


def remove_labelled(key_value: str) -> list[str]:
    """Removes the pods, containers, volumes, networks and images labelled KEY=VALUE; returns what it could not."""
    label = f"label={key_value}"
    left = []
    for kind, listing, removal in (
            ("pod", ["pod", "ps", "-q", "--filter", label], ["pod", "rm", "-f", "-t", "5"]),
            ("container", ["ps", "-aq", "--filter", label], ["rm", "-f", "-t", "5", "-v"]),
            ("volume", ["volume", "ls", "-q", "--filter", label], ["volume", "rm", "-f"]),
            ("network", ["network", "ls", "-q", "--filter", label], ["network", "rm", "-f"]),
            ("image", ["images", "-q", "--filter", label], ["rmi", "-f"])):
        names = podman(*listing, timeout=60, check=False).stdout.split()
        if names and podman(*removal, *names, timeout=120, check=False).returncode != 0:
            left.append(f"{kind}s {names}")
    podman("image", "prune", "-f", "--filter", label, timeout=120, check=False)  # the build stages' images
    return left
