#!/usr/bin/env bash
# `npm run package [-- --arch x64|arm64] [out]`: builds dist/nmi_<version>_<arch>.deb
# (amd64 or arm64; the host's architecture by default, the other cross-built), which
# installs on a Debian 12 or Ubuntu 22.04 node with no Node.js, compiler or network:
#   /usr/lib/nmi/bin/node      the Node.js runtime package-lock.json pins (runtime.sh)
#   /usr/lib/nmi/...           nmi's JavaScript, production node_modules, the addon
#                              and its eBPF object, and libbpf.so.1 beside the addon
#                              (Ubuntu 22.04 ships only libbpf0; the addon's RUNPATH
#                              is $ORIGIN, so it takes this one first)
#   /usr/bin/nmi               a link to /usr/lib/nmi/bin/nmi.js, whose #! names that runtime
#   /lib/systemd/system/nmi.service, /etc/default/nmi (a conffile)
# Only Debian's own tools: dpkg-shlibdeps works out Depends from the ELF files,
# dpkg-deb builds the archive. Needs `npm ci` to have run (addon and dist built).
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: npm run package -- [--arch x64|arm64] [output folder, default dist]"
arch=$(uname -m) out=dist
while [ $# -gt 0 ]; do
  case $1 in
    --arch) [ $# -ge 2 ] || { echo "package: --arch needs a value; $usage" >&2; exit 2; }; arch=$2; shift 2 ;;
    --arch=*) arch=${1#--arch=}; shift ;;
    -*) echo "package: unknown flag $1; $usage" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
case $arch in
  x64 | x86_64 | amd64) arch=x64 debarch=amd64 triplet=x86_64-linux-gnu ;;
  arm64 | aarch64) arch=arm64 debarch=arm64 triplet=aarch64-linux-gnu ;;
  *) echo "package: --arch is x64 or arm64, not $arch" >&2; exit 2 ;;
esac
version=$(node -p 'require("./package.json").version')
for f in build/Release/nmi.node dist/src/cli/main.js; do
  [ -f "$f" ] || { echo "package: $f is missing; run npm ci first" >&2; exit 1; }
done
# The runtime the lockfile pins for that architecture (its version goes to the build log).
runtime=$(bash scripts/runtime.sh "$arch")
if [ "$arch" = "$("$(bash scripts/runtime.sh 2>/dev/null)/bin/node" -p process.arch)" ]; then
  addon=build/Release strip=strip
else
  addon=$(bash scripts/build-addon.sh "$arch") strip=$triplet-strip
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/nmi
lib=$stage/usr/lib/nmi
mkdir -p "$lib/bin" "$lib/build/Release" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/default" \
  "$stage/usr/share/doc/nmi" "$stage/DEBIAN"

# The runtime, without its debug information; dynamic symbols stay for addons.
"$strip" --strip-unneeded -o "$lib/bin/node" "$runtime/bin/node"
sed '1s|^#!.*|#!/usr/lib/nmi/bin/node|' bin/nmi.js >"$lib/bin/nmi.js"
chmod 0755 "$lib/bin/nmi.js"
ln -s ../lib/nmi/bin/nmi.js "$stage/usr/bin/nmi"
cp package.json package-lock.json "$lib/"
mkdir -p "$lib/dist" && cp -r dist/src "$lib/dist/src"
install -m 0644 "$addon/nmi.node" "$lib/build/Release/"
dynamic="$(readelf -d "$addon/nmi.node")"
if grep -q 'NEEDED.*\[libbpf\.so\.1\]' <<<"$dynamic"; then
  install -m 0644 "$addon/nmi.bpf.o" "$lib/build/Release/"
  # Captured, not piped into grep -q, whose early exit pipefail reads as failure.
  grep -q 'RUNPATH.*\$ORIGIN' <<<"$dynamic" \
    || { echo "package: the addon's RUNPATH is not \$ORIGIN; rebuild it (npm ci)" >&2; exit 1; }
  libbpf=/usr/lib/$triplet/libbpf.so.1
  [ -e "$libbpf" ] || { echo "package: the addon links libbpf.so.1, and $libbpf is missing (libbpf-dev:$debarch)" >&2; exit 1; }
  install -m 0644 "$(readlink -f "$libbpf")" "$lib/build/Release/libbpf.so.1"
fi
# Production dependencies, from npm's cache where `npm ci` just put them; not the
# runtimes (optional dependencies: the one this package needs is bin/node).
(cd "$lib" && npm ci --omit=dev --omit=optional --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null)
rm -f "$lib/package-lock.json"

install -m 0644 systemd/nmi.service "$stage/lib/systemd/system/nmi.service"
install -m 0644 systemd/nmi.env "$stage/etc/default/nmi"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$stage/DEBIAN/"
echo /etc/default/nmi >"$stage/DEBIAN/conffiles"
cat >"$stage/usr/share/doc/nmi/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: nmi
Comment: nmi bundles the Node.js runtime (MIT and others, see its LICENSE),
 libbpf (LGPL-2.1 OR BSD-2-Clause) and the npm packages under
 /usr/lib/nmi/node_modules, each with its own licence file.

Files: *
License: MIT
COPYRIGHT

# Depends from what the ELF files link, as dpkg-shlibdeps finds it; the libbpf
# shipped beside the addon is nmi's own (-x keeps Debian's libbpf1 out).
mkdir -p "$work/src/debian"
printf 'Source: nmi\n\nPackage: nmi\nArchitecture: any\n' >"$work/src/debian/control"
elves=("$lib/bin/node" "$lib/build/Release/nmi.node")
[ -f "$lib/build/Release/libbpf.so.1" ] && elves+=("$lib/build/Release/libbpf.so.1")
depends=$(cd "$work/src" && DEB_HOST_ARCH=$debarch dpkg-shlibdeps -O -xlibbpf1 -l"$lib/build/Release" "${elves[@]}" 2>"$work/shlibdeps.err" | sed -n 's/^shlibs:Depends=//p') \
  || { cat "$work/shlibdeps.err" >&2; exit 1; }
[ -n "$depends" ] || { echo "package: dpkg-shlibdeps found no dependencies" >&2; cat "$work/shlibdeps.err" >&2; exit 1; }

cat >"$stage/DEBIAN/control" <<CONTROL
Package: nmi
Version: $version
Architecture: $debarch
Maintainer: nmi developers <nmi@localhost>
Section: net
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: $depends, init-system-helpers (>= 1.52)
Recommends: iptables | nftables, conntrack
Description: Azure IMDS managed-identity proxy for Kubernetes pods
 nmi redirects pods' calls to the Azure Instance Metadata Service to itself,
 finds the calling pod through the kubelet, and answers with a token for the
 Azure identity bound to it (aad-pod-identity's custom resources), as
 aad-pod-identity's NMI did. Runs as the systemd unit nmi.service, configured
 in /etc/default/nmi.
CONTROL

mkdir -p "$out"
deb="$out/nmi_${version}_${debarch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
