#!/bin/sh
# `make test-containers`: builds the images of docker/ with podman and runs them
# (tests/test_containers.py). Needs root: installs podman, runc, debootstrap, catatonit
# (the pause process `podman kube play` needs) and the CNI dnsname plugin (compose's
# containers find each other by name) with apt-get when missing. Extra arguments go to pytest.
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
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || missing="$missing catatonit"
[ -x /usr/lib/cni/dnsname ] || missing="$missing dnsname"
if [ -n "$missing" ]; then
    echo "test-containers: installing$missing"
    if ! { timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 \
            apt-get install -y -qq --no-install-recommends podman runc debootstrap catatonit \
            golang-github-containernetworking-plugin-dnsname >/dev/null; }; then
        echo "test-containers: cannot run: apt-get could not install$missing" >&2
        exit 1
    fi
fi
exec .venv/bin/python -m pytest tests/test_containers.py --containers -p no:cacheprovider -q -rA "$@"
