#!/usr/bin/env bash
# Fuzzes the REST API from its own description (docs/api.json) with
# schemathesis: every operation with generated and mutated requests, then
# the stateful phase, which follows the description's links from a guest
# made with POST /guests to the routes that take its id. Run from the
# repository root after `cargo build --release` (CI does); needs root and
# /dev/kvm (it makes small memtest guests), socat and schemathesis (PyPI).
#
# The positive_data_acceptance check is left out: a schema-valid body can
# still name a kernel that does not exist, which the API rightly refuses.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
port=${VMM_FUZZ_PORT:-18765}
vmm=target/release/vmm
cleanup() {
    kill "${socat_pid:-}" 2>/dev/null || true
    kill -INT "${server_pid:-}" 2>/dev/null || true
    wait "${server_pid:-}" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
# From inside $work: snapshots to the relative directories the fuzzer makes
# up land there, and go with it.
vmm=$PWD/$vmm
(cd "$work" && exec "$vmm" serve --api-socket "$work/api.sock" --console-dir "$work/consoles" > "$work/serve.log" 2>&1) &
server_pid=$!
for _ in $(seq 100); do [ -S "$work/api.sock" ] && break; sleep 0.1; done
socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$work/api.sock" &
socat_pid=$!
sleep 0.5
st run docs/api.json --url "http://127.0.0.1:$port" --checks all --exclude-checks positive_data_acceptance \
    --max-examples "${VMM_FUZZ_EXAMPLES:-40}" --workers 1 --phases examples,coverage,fuzzing,stateful \
    --seed "${VMM_FUZZ_SEED:-20261125}" --request-timeout 60
# The server survived all of it.
kill -0 "$server_pid"
echo "schemathesis: the API matched its description, and vmm serve is still up"
