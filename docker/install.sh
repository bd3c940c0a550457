#!/bin/sh
# Installs optserve from a source tree into a fresh virtualenv. Every image runs
# this script (docker/Dockerfile*), and tests/test_deploy.py runs the very same
# script outside Docker, so what the images install is what the tests install.
#
#   install.sh SOURCE [EXTRAS] [VENV] [PACKAGE...]
#
#   SOURCE   a tree holding pyproject.toml, README.md, client/ and server/
#   EXTRAS   comma-separated extras of pyproject.toml: "server" (JAX), "demo"
#            (scikit-learn, matplotlib), or "" for the client alone
#   VENV     the virtualenv to create (default /opt/venv); its bin/ holds `optserve`
#   PACKAGE  more requirements resolved together with optserve, e.g. "jax[cuda12]"
#
# $PYTHON picks the interpreter that creates the venv (default python3). pip
# reads its usual configuration (pip.conf, PIP_* variables); no cache is kept.
# What the server never runs is then removed from the venv: pip and setuptools
# (nothing installs at run time) and the packages' own test suites.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: install.sh SOURCE [EXTRAS] [VENV] [PACKAGE...]" >&2
    exit 2
fi
source_dir=$1
extras=${2:-}
venv=${3:-/opt/venv}
shift $(( $# < 3 ? $# : 3 ))

requirement=$source_dir
if [ -n "$extras" ]; then
    requirement="$source_dir[$extras]"
fi

"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --no-cache-dir --quiet "$requirement" "$@"
"$venv/bin/python" -m pip uninstall --yes --quiet pip setuptools
find "$venv"/lib/python3*/site-packages -depth -type d -name tests -exec rm -rf {} +

# Fails the build now, not the container later, if the command does not start.
"$venv/bin/optserve" --help >/dev/null
echo "installed $requirement $* into $venv"
