#!/bin/sh
# `make test-containers`: builds the images of docker/ with podman and runs them
# (tests/test_containers.py). Needs root: installs podman, runc and debootstrap with
# apt-get when they are missing. Extra arguments go to pytest.
set -eu
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "test-containers: cannot run: needs root (rootful podman with runc, debootstrap)" >&2
    exit 1
fi
missing=""
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    echo "test-containers: installing$missing"
    if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
            apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null; }; then
        echo "test-containers: cannot run: apt-get could not install$missing" >&2
        exit 1
    fi
fi
exec .venv/bin/python -m pytest tests/test_containers.py --containers -p no:cacheprovider -q -rA "$@"
