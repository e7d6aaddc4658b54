#!/usr/bin/env bash
# `build-addon.sh [x64|arm64]`: builds the addon with node-gyp against the headers
# of the runtime nmi ships for that architecture (runtime.sh), under that runtime,
# never the PATH's node. The host's architecture (npm's install step) builds into
# build/Release; the other is cross-compiled with Debian's gcc for it, in a folder
# of its own (node-gyp always writes ./build), into build/<arch>/Release, where
# package.sh takes it. The eBPF object is built for the target's headers too.
set -euo pipefail
cd "$(dirname "$0")/.."
host=$(bash scripts/runtime.sh 2>/dev/null)
host_arch=$("$host/bin/node" -p process.arch)
arch=${1:-$host_arch}
rt=$(bash scripts/runtime.sh "$arch")
export PATH="$host/bin:$PATH"
gyp=$PWD/node_modules/.bin/node-gyp
if [ "$arch" = "$host_arch" ]; then
  exec "$gyp" rebuild --nodedir="$rt"
fi
case $arch in
  arm64) triplet=aarch64-linux-gnu ;;
  x64) triplet=x86_64-linux-gnu ;;
esac
command -v "$triplet-g++" >/dev/null || { echo "build-addon: no $triplet-g++ to build for $arch (Debian's g++-$triplet; scripts/install-deps.sh installs it)" >&2; exit 1; }
out=build/$arch
rm -rf "$out" && mkdir -p "$out"
cp binding.gyp "$out/"
ln -s ../../native ../../node_modules "$out/"
(cd "$out" && CC=$triplet-gcc CXX=$triplet-g++ "$gyp" rebuild --arch="$arch" --nodedir="$rt" >build.log 2>&1) \
  || { tail -n 30 "$out/build.log" >&2; echo "build-addon: the $arch build failed, see $out/build.log" >&2; exit 1; }
mkdir -p "$out/Release"
cp "$out/build/Release/nmi.node" "$out/Release/"
[ ! -f "$out/build/Release/nmi.bpf.o" ] || cp "$out/build/Release/nmi.bpf.o" "$out/Release/"
echo "$out/Release"
