#!/usr/bin/env bash
# `npm run package`: builds dist/nmi_<version>_<arch>.deb, which installs on a
# Debian 12 or Ubuntu 22.04 node with no Node.js, compiler or network:
#   /usr/lib/nmi/bin/node      the Node.js runtime this was built with
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
out=${1:-dist}
node=$(command -v node)
version=$(node -p 'require("./package.json").version')
arch=$(dpkg --print-architecture)
for f in build/Release/nmi.node dist/src/cli/main.js; do
  [ -f "$f" ] || { echo "package: $f is missing; run npm ci first" >&2; exit 1; }
done
node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 18) ? 0 : 1)' \
  || { echo "package: node $(node -v) is older than package.json's engines (>= 20.18.1)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/nmi
lib=$stage/usr/lib/nmi
mkdir -p "$lib/bin" "$lib/build/Release" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/default" \
  "$stage/usr/share/doc/nmi" "$stage/DEBIAN"

# The runtime, without its debug information (99 MB -> 86 MB); dynamic symbols stay for addons.
strip --strip-unneeded -o "$lib/bin/node" "$node"
sed '1s|^#!.*|#!/usr/lib/nmi/bin/node|' bin/nmi.js >"$lib/bin/nmi.js"
chmod 0755 "$lib/bin/nmi.js"
ln -s ../lib/nmi/bin/nmi.js "$stage/usr/bin/nmi"
cp package.json package-lock.json "$lib/"
mkdir -p "$lib/dist" && cp -r dist/src "$lib/dist/src"
install -m 0644 build/Release/nmi.node "$lib/build/Release/"
if [ -f build/Release/nmi.bpf.o ]; then
  install -m 0644 build/Release/nmi.bpf.o "$lib/build/Release/"
  libbpf=$(ldd build/Release/nmi.node | awk '$1 == "libbpf.so.1" { print $3 }')
  [ -n "$libbpf" ] || { echo "package: the addon was built with eBPF but links no libbpf.so.1" >&2; exit 1; }
  # Captured, not piped into grep -q, whose early exit pipefail reads as failure.
  dynamic="$(readelf -d build/Release/nmi.node)"
  grep -q 'RUNPATH.*\$ORIGIN' <<<"$dynamic" \
    || { echo "package: the addon's RUNPATH is not \$ORIGIN; rebuild it (npm ci)" >&2; exit 1; }
  install -m 0644 "$(readlink -f "$libbpf")" "$lib/build/Release/libbpf.so.1"
fi
# Production dependencies, from npm's cache where `npm ci` just put them.
(cd "$lib" && npm ci --omit=dev --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=error >/dev/null)
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
depends=$(cd "$work/src" && dpkg-shlibdeps -O -xlibbpf1 -l"$lib/build/Release" "${elves[@]}" 2>"$work/shlibdeps.err" | sed -n 's/^shlibs:Depends=//p') \
  || { cat "$work/shlibdeps.err" >&2; exit 1; }
[ -n "$depends" ] || { echo "package: dpkg-shlibdeps found no dependencies" >&2; cat "$work/shlibdeps.err" >&2; exit 1; }

cat >"$stage/DEBIAN/control" <<CONTROL
Package: nmi
Version: $version
Architecture: $arch
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
deb="$out/nmi_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
