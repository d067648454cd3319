#!/usr/bin/env bash
# Fuzzes the public API against its own OpenAPI document: starts
# `server dev` (a local Redis master, replicas and sentinels) on a free
# port, logs in as a demo user, and runs schemathesis (from PyPI, in a venv
# under target/) with every check. Fails on any failure or server error.
#
#   tests/schemathesis/run.sh [path/to/server]   (default target/debug/server)
#
# SCHEMATHESIS_MAX_EXAMPLES bounds the examples per operation (default
# 100: about a minute on a small machine). SCHEMATHESIS_SEED picks the
# data (default fixed, so that CI draws the same for the same code: the
# store counts lengths in bytes and JSON Schema in characters, so a rare
# long non-ASCII name could be refused before its maxLength); `random`
# for a new seed. Extra arguments after the server go to schemathesis.
set -euo pipefail
cd "$(dirname "$0")/../.."

SCHEMATHESIS=schemathesis==4.32.5
venv=target/schemathesis-venv
server=${1:-target/debug/server}
shift || true
here=tests/schemathesis

if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$SCHEMATHESIS"
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=target/schemathesis-server.log
"$server" dev --listen "127.0.0.1:$port" --admin-listen off >"$log" 2>&1 &
pid=$!
# SIGINT, as Ctrl-C: the dev server stops its Redis processes on the way out.
stop() {
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
trap stop EXIT

password=""
for _ in $(seq 1 240); do
  password=$(sed -n 's/^password: *//p' "$log" | head -n 1)
  [ -n "$password" ] && break
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "server dev exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
if [ -z "$password" ]; then
  echo "server dev did not start in 2 minutes:" >&2
  cat "$log" >&2
  exit 1
fi

base="http://127.0.0.1:$port"
token=$(python3 - "$base" "$password" <<'PY'
import json, sys, urllib.parse, urllib.request
base, password = sys.argv[1], sys.argv[2]
form = urllib.parse.urlencode({"username": "user1", "password": password}).encode()
with urllib.request.urlopen(base + "/token", data=form, timeout=30) as reply:
    print(json.load(reply)["access_token"])
PY
)

seed=(--seed "${SCHEMATHESIS_SEED:-20261130}")
if [ "${SCHEMATHESIS_SEED:-}" = random ]; then seed=(); fi

# The hooks and settings (schemathesis.toml) say what the fuzzer cannot
# know from the document alone; each says why.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export SCHEMATHESIS_HOOKS=hooks
"$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" run "$base/openapi.json" \
  --checks all \
  --header "Authorization: Bearer $token" \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-100}" \
  --workers 2 \
  --request-timeout 15 \
  --generation-database none \
  "${seed[@]}" \
  --no-color \
  "$@"
