#!/usr/bin/env bash
# Runs the addon's test files against an AddressSanitizer + UBSan build of
# nmi.node:  scripts/asan-test.sh [test file filter ...]
# The instrumented addon is built in a scratch copy of the project, so the
# normal build/ (and anyone using it meanwhile) is left alone. node itself is
# not instrumented: gcc's libasan is preloaded, and leak detection is off
# because node does not free everything at exit. Every sanitizer report, from
# the test processes or the nmi daemons they start, goes to a log file; any
# such file fails the run, whatever the tests said. Needs root, as npm test.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
default_tests=(server/native-differential systemd/notify e2e/token-native e2e/graceful-stop e2e/rules-nftables e2e/ebpf)
filters=("${@:-${default_tests[@]}}")
work="$(mktemp -d "${TMPDIR:-/tmp}/nmi-asan.XXXXXX")"
trap 'rm -rf "$work"' EXIT

libasan="$(gcc -print-file-name=libasan.so)"
[ -f "$libasan" ] || { echo "asan-test: gcc's libasan.so not found (Debian: libasan8 with gcc)" >&2; exit 2; }

(cd "$root" && npx tsc -p .)
# The runtime nmi ships (runtime.sh): its headers for the build, and it runs the tests.
runtime="$(bash "$root/scripts/runtime.sh")"
export PATH="$runtime/bin:$PATH"
mkdir -p "$work/nmi" "$work/reports"
cp -r "$root"/{bin,dist,native,binding.gyp,package.json} "$work/nmi/"
ln -s "$root/node_modules" "$work/nmi/node_modules"

sanitize="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
(cd "$work/nmi" && CXX=g++ CC=gcc CFLAGS="$sanitize" CXXFLAGS="$sanitize" LDFLAGS="-fsanitize=address,undefined" \
  npx node-gyp rebuild --nodedir="$runtime" >"$work/build.log" 2>&1) || { cat "$work/build.log" >&2; exit 1; }
# Captured, not piped into grep -q: grep leaving at the first match makes the
# loader's next write a SIGPIPE, which pipefail turns into a false failure.
linked="$(ldd "$work/nmi/build/Release/nmi.node")"
[[ "$linked" == *libasan* ]] || { echo "asan-test: the addon is not instrumented" >&2; exit 1; }

tests=()
for f in $(cd "$work/nmi" && find dist/test -name '*.test.js' | sort); do
  for want in "${filters[@]}"; do
    if [[ "$f" == *"$want"* ]]; then tests+=("$f"); break; fi
  done
done
[ "${#tests[@]}" -gt 0 ] || { echo "asan-test: no test file matches ${filters[*]}" >&2; exit 2; }
echo "asan-test: ${tests[*]}"

set +e
(cd "$work/nmi" && LD_PRELOAD="$libasan" \
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$work/reports/asan" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$work/reports/ubsan" \
  node --test --test-concurrency=2 --test-timeout=300000 "${tests[@]}")
status=$?
set -e
if compgen -G "$work/reports/*" >/dev/null; then
  cat "$work"/reports/* >&2
  echo "asan-test: sanitizer reports above" >&2
  exit 1
fi
[ "$status" -eq 0 ] || { echo "asan-test: tests failed (exit $status)" >&2; exit "$status"; }
echo "asan-test: clean"
