#!/usr/bin/env bash
# Fuzzes the native server's request framing and token rules (native/http-parse.cc,
# native/token-request.cc) and its connection state machine (native/connection.cc) with libFuzzer under AddressSanitizer and UBSan for a bounded time:
#   scripts/fuzz.sh [seconds]   (default 60)
# Runs on a copy of test/fuzz/corpus, so the committed corpus does not grow;
# exits non-zero on any finding (crash, sanitizer report, failed invariant,
# leak, timeout), leaving the reproducer in the work folder it prints.
# Needs clang and libclang_rt.fuzzer (Debian: clang, libclang-rt-14-dev).
set -euo pipefail
seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/nmi-fuzz.XXXXXX")"
cxx="${CXX_FUZZ:-clang++}"
if ! compgen -G "$("$cxx" -print-runtime-dir)/libclang_rt.fuzzer*" >/dev/null; then
  echo "fuzz: libFuzzer is missing (Debian: apt-get install libclang-rt-14-dev)" >&2
  exit 2
fi

# Two targets, each for the whole time: the framing and token rules (parse_fuzzer.cc)
# and one connection's state machine with its bounds (connection_fuzzer.cc).
for target in parse connection; do
  "$cxx" -g -O1 -std=c++17 -Wall -Wextra \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    "$root/native/http-parse.cc" "$root/native/token-request.cc" "$root/native/connection.cc" "$root/test/fuzz/${target}_fuzzer.cc" -o "$work/${target}_fuzzer"
done

mkdir -p "$work/corpus" "$work/findings"
cp "$root"/test/fuzz/corpus/* "$work/corpus/"
cd "$work"
for target in parse connection; do
  echo "fuzz: $target, ${seconds}s in $work"
  set +e
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 "./${target}_fuzzer" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
    -dict="$root/test/fuzz/http.dict" -artifact_prefix="$work/findings/$target-" -print_final_stats=1 \
    corpus 2>&1 | tee "$target.log" | grep -v -E '^#[0-9]+\s+(NEW|REDUCE)'
  status=${PIPESTATUS[0]}
  set -e
  if [ "$status" -ne 0 ] || [ -n "$(ls -A findings)" ]; then
    echo "fuzz: FINDING in $target (exit $status); reproducers in $work/findings, log in $work/$target.log" >&2
    exit 1
  fi
done
echo "fuzz: no finding in ${seconds}s per target"
rm -rf "$work"
