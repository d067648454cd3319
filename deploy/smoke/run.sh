#!/usr/bin/env bash
# Runs the manifests' smoke test (deploy/smoke/smoke.py) with PyYAML from
# PyPI in a venv of its own, the way deploy/validate.sh installs its tools.
#   deploy/smoke/run.sh target/debug/server [--keep] [--only 2,3]
set -euo pipefail
cd "$(dirname "$0")/../.."

PYYAML=PyYAML==6.0.3
venv=target/smoke-venv

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import yaml' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$PYYAML"
fi
exec "$venv/bin/python" deploy/smoke/smoke.py "$@"
