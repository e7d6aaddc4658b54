#!/usr/bin/env bash
# `runtime.sh [x64|arm64]` prints the folder of the Node.js runtime nmi ships for
# that architecture (the host's by default): the registry package node-linux-<arch>
# at the version and integrity package-lock.json pins, with bin/node and the
# headers the addon builds against (include/node). Never the PATH's node.
#
# The host's architecture is what `npm ci` installed (an optionalDependency); the
# other one npm skips as foreign, so it is fetched here through npm's cache into
# build/runtime/, checked against the lockfile's integrity, and unpacked there.
# The build log gets one line naming the runtime (stderr; stdout is the folder).
set -euo pipefail
cd "$(dirname "$0")/.."
case ${1:-$(uname -m)} in
  x64 | x86_64 | amd64) arch=x64 ;;
  arm64 | aarch64) arch=arm64 ;;
  *) echo "runtime: nmi ships x64 and arm64 runtimes, not ${1:-$(uname -m)}" >&2; exit 2 ;;
esac
name=node-linux-$arch
# Any node parses JSON; the one that runs nmi is the one this script prints.
read -r version integrity < <(node -e '
  const lock = require("./package-lock.json").packages["node_modules/" + process.argv[1]];
  if (!lock) { console.error(`runtime: package-lock.json pins no ${process.argv[1]}; run npm install`); process.exit(1); }
  console.log(lock.version, lock.integrity);' "$name")

dir=node_modules/$name
if [ "$(node -p 'require(process.argv[1]).version' "$PWD/$dir/package.json" 2>/dev/null)" != "$version" ]; then
  dir=build/runtime/$name-$version
  if [ ! -x "$dir/bin/node" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    tgz=$(cd "$tmp" && npm pack --silent "$name@$version")
    got="sha512-$(openssl dgst -sha512 -binary "$tmp/$tgz" | base64 -w0)"
    [ "$got" = "$integrity" ] || { echo "runtime: $name@$version from the registry is $got, package-lock.json pins $integrity" >&2; exit 1; }
    mkdir -p "$dir.tmp"
    tar -xzf "$tmp/$tgz" -C "$dir.tmp" --strip-components=1
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
fi
[ -f "$dir/include/node/node_api.h" ] || { echo "runtime: $dir has no headers (include/node)" >&2; exit 1; }
echo "runtime: Node.js v$version for linux-$arch ($name@$version, $integrity)" >&2
echo "$PWD/$dir"
