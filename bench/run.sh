#!/bin/sh
# Build, then run the benchmark; arguments go to it (see bench/README.md).
set -eu
cd "$(dirname "$0")/.."
npx tsc -p . >/dev/null || true # tsc emits even when files elsewhere have type errors
exec node dist/bench/bench.js "$@"
